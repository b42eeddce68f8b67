"""Checker for the records area written by vmdr-writer (record format: layout.py).

"Consistent prefix" means the image could be the state of the records area at one instant
of the writer's life (as after a crash, or in a crash-consistent backup). Precisely, with
``hi`` the highest valid sequence number and ``n`` the number of slots:

* a slot is *valid* if magic, CRC-32, ``nslots`` and payload are right and ``seq % n`` is
  the slot index; a valid slot never holds anything else;
* the valid sequence numbers form one contiguous run ``lo..hi`` (nothing valid after a gap);
* the run is complete: ``lo == max(0, hi - n + 1)`` (all records written so far, or the
  last ``n`` once the writer has wrapped around), except that the single slot
  ``(hi + 1) % n`` -- the write that was in flight -- may be torn (neither valid, nor
  zeros, nor the old record), which after a wrap-around loses record ``hi + 1 - n``;
* every other slot that is not valid is all zeros (never written).

An empty area (all zeros, or only a torn slot 0) is consistent with ``last_seq == -1``.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest import layout as L

Buffer = bytes | bytearray | memoryview
_ZERO = bytes(L.RECORD_SIZE)
_MAX_PROBLEMS = 20


@dataclass
class RecordCheck:
    last_seq: int  # highest valid seq, -1 if none
    count: int  # number of valid records
    consistent: bool
    problems: list[str] = field(default_factory=list)
    first_seq: int = -1
    nslots: int = 0
    torn_slot: int | None = None  # slot of a torn (in-flight) record, if any


def make_record(seq: int, nslots: int, *, time_ns: int = 0, session: int = 0) -> bytes:
    """Python twin of vmdr-writer's record encoder (for tests of the checker)."""
    head = L.RECORD_HEADER.pack(L.RECORD_MAGIC, seq, time_ns, nslots, session)
    body = head + struct.pack("<Q", seq ^ L.PAYLOAD_XOR) * L.PAYLOAD_WORDS + b"\0\0\0\0"
    return body + struct.pack("<I", zlib.crc32(body))


def parse_record(rec: Buffer, slot: int, nslots: int) -> int | None:
    """Sequence number of a valid record in ``slot``, else None."""
    if rec[:8] != L.RECORD_MAGIC:
        return None
    (crc,) = struct.unpack_from("<I", rec, L.CRC_OFFSET)
    if zlib.crc32(rec[: L.CRC_OFFSET]) != crc:
        return None
    _, seq, _, ns, _ = L.RECORD_HEADER.unpack_from(rec)
    if ns != nslots or seq % nslots != slot:
        return None
    word = struct.pack("<Q", seq ^ L.PAYLOAD_XOR)
    if rec[L.PAYLOAD_OFFSET : L.PAYLOAD_OFFSET + 8 * L.PAYLOAD_WORDS] != word * L.PAYLOAD_WORDS:
        return None
    return int(seq)


def check_area(area: Buffer) -> RecordCheck:
    """Check a bare records area (``len(area) // RECORD_SIZE`` slots)."""
    mv = memoryview(area)
    nslots = len(mv) // L.RECORD_SIZE
    if nslots < 2:
        return RecordCheck(-1, 0, False, [f"records area too small: {len(mv)} bytes"])
    seqs: dict[int, int] = {}  # slot -> seq
    garbage: list[int] = []
    for slot in range(nslots):
        rec = mv[slot * L.RECORD_SIZE : (slot + 1) * L.RECORD_SIZE]
        seq = parse_record(rec, slot, nslots)
        if seq is not None:
            seqs[slot] = seq
        elif rec != _ZERO:
            garbage.append(slot)
    return _judge(seqs, garbage, nslots)


def _judge(seqs: dict[int, int], garbage: list[int], nslots: int) -> RecordCheck:
    problems: list[str] = []
    if not seqs:
        torn = garbage[0] if garbage == [0] else None
        problems += [f"slot {s}: invalid record" for s in garbage if s != torn]
        return _result(-1, 0, -1, nslots, torn, problems)
    hi = max(seqs.values())
    lo = min(seqs.values())
    next_slot = (hi + 1) % nslots
    expected_lo = max(0, hi - nslots + 1)
    torn = next_slot if next_slot in garbage else None
    if len(seqs) != hi - lo + 1:
        present = set(seqs.values())
        gaps = [s for s in range(lo, hi + 1) if s not in present]
        problems.append(f"{len(gaps)} records missing inside {lo}..{hi}, first {gaps[:5]}")
    allowed_lo = {expected_lo}
    if hi >= nslots - 1 and next_slot not in seqs:
        allowed_lo.add(expected_lo + 1)  # oldest record overwritten by the in-flight write
    if lo not in allowed_lo:
        problems.append(f"oldest valid record is {lo}, expected {expected_lo}")
    problems += [
        f"slot {s}: invalid record (not the in-flight slot {next_slot})"
        for s in garbage
        if s != next_slot
    ]
    return _result(hi, len(seqs), lo, nslots, torn, problems)


def _result(
    hi: int, count: int, lo: int, nslots: int, torn: int | None, problems: list[str]
) -> RecordCheck:
    if len(problems) > _MAX_PROBLEMS:
        problems = [*problems[:_MAX_PROBLEMS], f"... and {len(problems) - _MAX_PROBLEMS} more"]
    return RecordCheck(hi, count, not problems, problems, lo, nslots, torn)


def records_extent(disk: Buffer) -> tuple[int, int]:
    """(offset, size) of partition 2 from the MBR; layout defaults if there is no MBR."""
    mbr = bytes(disk[:512])
    if len(mbr) == 512 and mbr[510:512] == b"\x55\xaa":
        _, _, start, sectors = struct.unpack_from("<B7sII", mbr, 446 + 16)
        if sectors:
            return start * 512, sectors * 512
    return L.RECORDS_START, L.RECORDS_SIZE


def check_records(
    source: str | Path | Buffer, fmt: str = "raw", *, force_share: bool = False
) -> RecordCheck:
    """Check the records area of a data-disk image (a file of format ``fmt``, or raw bytes).

    The area is partition 2 of the image's MBR. Non-raw files are converted with
    ``qemu-img convert`` into a sparse temp file first; ``force_share`` passes ``-U`` so an
    image still open by a running QEMU can be read (the result is then only a best effort).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        if fmt != "raw":
            raise ValueError("bytes input must be a raw disk image")
        off, size = records_extent(source)
        return _with_extent_check(source, off, size)
    path = Path(source)
    if fmt == "raw":
        return _check_raw_file(path)
    with tempfile.TemporaryDirectory(prefix="vmdr-records-") as tmp:
        raw = Path(tmp) / "disk.raw"
        cmd = ["qemu-img", "convert", "-q", "-f", fmt, "-O", "raw"]
        if force_share:
            cmd.append("-U")
        subprocess.run([*cmd, str(path), str(raw)], check=True, capture_output=True)
        return _check_raw_file(raw)


def _check_raw_file(path: Path) -> RecordCheck:
    with open(path, "rb") as f:
        off, size = records_extent(f.read(512))
        f.seek(off)
        area = f.read(size)
    if len(area) < size:
        return RecordCheck(-1, 0, False, [f"image too short for records area at {off}+{size}"])
    return check_area(area)


def _with_extent_check(disk: Buffer, off: int, size: int) -> RecordCheck:
    if len(disk) < off + size:
        return RecordCheck(-1, 0, False, [f"image too short for records area at {off}+{size}"])
    return check_area(memoryview(disk)[off : off + size])
