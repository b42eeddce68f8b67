"""The on-tape archive format: round trip, MAC checks, truncation, sealing, labels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdr.errors import IntegrityError, LabelUnreadable, UnsupportedFormat
from vmdr.tape.formats import (
    KIND_CHUNKS,
    T_CHUNK,
    ArchiveReader,
    ArchiveWriter,
    pool_key,
    tape_mac_key,
)
from vmdr.tape.library import Library
from vmdr.tape.virtual import VirtualLibrary

KEY = tape_mac_key(b"k" * 64)


@pytest.fixture
def lib(tmp_path: Path) -> tuple[VirtualLibrary, Library]:
    vl = VirtualLibrary.create(tmp_path / "vtl", slots=2, ie_slots=0, capacity=64 << 20)
    vl.add_tape("T1", 1)
    vl.changer().load(1)
    return vl, Library(vl.drive(), vl.changer(), 1)


def _write(lib: Library, payloads: list[bytes], key: bytes | None = KEY,
           seal: bytes | None = None) -> None:
    lib.drive.rewind()
    w = ArchiveWriter(lib.drive, KIND_CHUNKS, {"file": 0}, key, seal)
    for i, p in enumerate(payloads):
        w.add(T_CHUNK, bytes([i]) * 32, p)
    w.finish()
    lib.drive.rewind()


def test_roundtrip_across_blocks(lib: tuple[VirtualLibrary, Library]) -> None:
    _, lb = lib
    payloads = [os.urandom(n) for n in (0, 1, 300_000, 1 << 20, 17)]
    _write(lb, payloads)
    r = ArchiveReader(lb.drive, KEY)
    assert r.kind == KIND_CHUNKS and r.header["file"] == 0
    got = [f.payload for f in r.frames()]
    assert got == payloads
    assert lb.drive.position() == 1


def test_wrong_key_and_tampering_are_caught(lib: tuple[VirtualLibrary, Library]) -> None:
    vl, lb = lib
    _write(lb, [b"x" * 1000, b"y" * 1000])
    with pytest.raises(LabelUnreadable):
        ArchiveReader(lb.drive, tape_mac_key(b"z" * 64), unreadable=LabelUnreadable)
    lb.drive.rewind()
    path = vl.tape_dir("T1") / "file-00000"
    data = bytearray(path.read_bytes())
    data[data.index(b"y" * 10)] ^= 1
    path.write_bytes(bytes(data))
    r = ArchiveReader(lb.drive, KEY)
    with pytest.raises(IntegrityError, match="MAC"):
        list(r.frames())


def test_truncated_file_is_detected(lib: tuple[VirtualLibrary, Library]) -> None:
    vl, lb = lib
    _write(lb, [b"x" * 1000, b"y" * 1000])
    path = vl.tape_dir("T1") / "file-00000"
    path.write_bytes(path.read_bytes()[:1500])
    r = ArchiveReader(lb.drive, KEY)
    with pytest.raises(IntegrityError):
        list(r.frames())


def test_not_vmdr_and_newer_version(lib: tuple[VirtualLibrary, Library]) -> None:
    vl, lb = lib
    lb.drive.rewind()
    lb.drive.write_block(b"tar archive, not ours" * 10)
    lb.drive.write_filemark()
    lb.drive.rewind()
    with pytest.raises(LabelUnreadable):
        lb.read_label()
    _write(lb, [b"a"])
    path = vl.tape_dir("T1") / "file-00000"
    raw = bytearray(path.read_bytes())
    raw[8] = 9  # version
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFormat):
        ArchiveReader(lb.drive, KEY)


def test_sealed_payloads(lib: tuple[VirtualLibrary, Library]) -> None:
    vl, lb = lib
    seal = pool_key(b"pool secret")
    _write(lb, [b"PLAINTEXT" * 100], seal=seal)
    assert b"PLAINTEXT" not in (vl.tape_dir("T1") / "file-00000").read_bytes()
    with pytest.raises(LabelUnreadable, match="pool key"):
        ArchiveReader(lb.drive, KEY)
    lb.drive.rewind()
    assert [f.payload for f in ArchiveReader(lb.drive, KEY, seal).frames()] == \
        [b"PLAINTEXT" * 100]


def test_label_roundtrip(lib: tuple[VirtualLibrary, Library]) -> None:
    from datetime import UTC, datetime

    _, lb = lib
    m = lb.write_label("T1", "daily", datetime(2026, 1, 1, tzinfo=UTC))
    got = lb.read_label()
    assert (got.label, got.uuid, got.pool) == ("T1", m.uuid, "daily")
