"""Unit tests of the records checker (no VM needed)."""

from __future__ import annotations

import pytest

from tests.guest import layout as L
from tests.guest.records import check_area, check_records, make_record

N = 8
ZERO = bytes(L.RECORD_SIZE)


def area(last: int | None, *, n: int = N, torn: bool = False) -> bytearray:
    """Area after writing seqs 0..last (None: nothing) and optionally tearing last+1."""
    buf = bytearray(n * L.RECORD_SIZE)
    if last is not None:
        for seq in range(last + 1):
            put(buf, seq % n, make_record(seq, n))
    if torn:
        seq = 0 if last is None else last + 1
        old = bytes(buf[(seq % n) * L.RECORD_SIZE :][: L.RECORD_SIZE])
        new = make_record(seq, n)
        put(buf, seq % n, new[:1024] + old[1024:] if old != ZERO else new[:1024] + ZERO[1024:])
    return buf


def put(buf: bytearray, slot: int, rec: bytes) -> None:
    buf[slot * L.RECORD_SIZE : (slot + 1) * L.RECORD_SIZE] = rec


@pytest.mark.parametrize("last", [None, 0, 3, N - 2, N - 1, N, 3 * N + 5])
@pytest.mark.parametrize("torn", [False, True])
def test_consistent_prefixes(last: int | None, torn: bool) -> None:
    r = check_area(area(last, torn=torn))
    assert r.consistent, r.problems
    assert r.last_seq == (-1 if last is None else last)
    if last is not None:
        expected = min(last + 1, N) - (1 if torn and last + 1 >= N else 0)
        assert r.count == expected
        assert r.torn_slot == ((last + 1) % N if torn else None)


def test_gap_is_inconsistent() -> None:
    buf = area(5)
    put(buf, 2, ZERO)
    r = check_area(buf)
    assert not r.consistent
    assert r.last_seq == 5


def test_corrupt_record_is_inconsistent() -> None:
    buf = area(5)
    buf[3 * L.RECORD_SIZE + 100] ^= 0xFF
    assert not check_area(buf).consistent


def test_valid_after_torn_is_inconsistent() -> None:
    buf = area(3, torn=True)
    put(buf, 6, make_record(6, N))
    assert not check_area(buf).consistent


def test_stale_lap_is_inconsistent() -> None:
    buf = area(2 * N + 2)
    put(buf, 5, make_record(5, N))  # a record from two laps ago
    assert not check_area(buf).consistent


def test_check_records_on_raw_disk_bytes() -> None:
    disk = bytearray(L.RECORDS_START + N * L.RECORD_SIZE)
    disk[L.RECORDS_START :] = area(4)
    r = check_records(bytes(disk))  # no MBR: layout defaults, size N slots is too short
    assert not r.consistent
    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    mbr[446 + 16 + 8 : 446 + 16 + 16] = (L.RECORDS_START // 512).to_bytes(4, "little") + (
        N * L.RECORD_SIZE // 512
    ).to_bytes(4, "little")
    disk[:512] = mbr
    r = check_records(bytes(disk))
    assert r.consistent and r.last_seq == 4 and r.count == 5
