"""Extent handling of the NBD and file readers."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmdr.errors import HypervisorError
from vmdr.hypervisor.nbd import (
    BASE_ALLOCATION,
    Extent,
    FileReader,
    NbdReader,
    allocation_is_data,
    dirty_context,
    entries_to_extents,
    merge,
)


def test_entries_are_clipped_to_the_window() -> None:
    got = entries_to_extents(100, [50, 0, 1000, 3, 10, 0], 200, allocation_is_data)
    assert got == [Extent(100, 50, True), Extent(150, 50, False)]


def test_merge_coalesces_same_kind() -> None:
    ex = [Extent(0, 10, True), Extent(10, 5, True), Extent(15, 5, False), Extent(20, 0, True),
          Extent(20, 5, False), Extent(25, 1, True)]
    assert list(merge(iter(ex))) == [Extent(0, 15, True), Extent(15, 10, False),
                                     Extent(25, 1, True)]


class FakeHandle:
    """Serves block_status from a list of (length, flags) with optional overshoot."""

    def __init__(self, size: int, layout: list[tuple[int, int]], ctx: str) -> None:
        self.size, self.layout, self.ctx = size, layout, ctx
        self.reads: list[tuple[int, int]] = []

    def set_handle_name(self, n: str) -> None: ...
    def add_meta_context(self, c: str) -> None: ...
    def can_meta_context(self, c: str) -> bool:
        return c == self.ctx

    def get_size(self) -> int:
        return self.size

    def block_status(self, count: int, offset: int, cb: Any) -> None:
        pos, entries = 0, []
        for length, flags in self.layout:
            if pos + length > offset:
                start = max(pos, offset)
                entries += [pos + length - start, flags]  # may run past offset+count
                if len(entries) >= 4:
                    break
            pos += length
        cb("other:context", offset, [count, 0], 0)
        cb(self.ctx, offset, entries, 0)

    def pread(self, count: int, offset: int) -> bytes:
        self.reads.append((count, offset))
        return b"x" * count

    def shutdown(self) -> None: ...


@pytest.fixture
def fake_nbd(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    box: dict[str, Any] = {}
    mod = types.ModuleType("nbd")
    mod.NBD = lambda: box["handle"]  # type: ignore[attr-defined]
    mod.Error = RuntimeError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nbd", mod)
    yield box


def test_nbd_extents_span_windows(fake_nbd: dict[str, Any]) -> None:
    size = 10 << 20
    layout = [(3 << 20, 0), (4 << 20, 3), (3 << 20, 0)]
    fake_nbd["handle"] = FakeHandle(size, layout, BASE_ALLOCATION)
    r = NbdReader(lambda h: None, BASE_ALLOCATION, label="vda")
    ex = list(r.extents(window=2 << 20))
    assert ex == [Extent(0, 3 << 20, True), Extent(3 << 20, 4 << 20, False),
                  Extent(7 << 20, 3 << 20, True)]
    assert sum(e.length for e in ex) == size


def test_nbd_dirty_bitmap_flags(fake_nbd: dict[str, Any]) -> None:
    ctx = dirty_context("vda")
    fake_nbd["handle"] = FakeHandle(4096 * 3, [(4096, 0), (4096, 1), (4096, 0)], ctx)
    r = NbdReader(lambda h: None, ctx, label="vda")
    assert [e for e in r.extents() if e.is_data] == [Extent(4096, 4096, True)]


def test_nbd_reads_are_split(fake_nbd: dict[str, Any]) -> None:
    h = FakeHandle(100 << 20, [(100 << 20, 0)], BASE_ALLOCATION)
    fake_nbd["handle"] = h
    r = NbdReader(lambda h: None, BASE_ALLOCATION, label="vda")
    assert len(r.read(0, 40 << 20)) == 40 << 20
    assert h.reads == [(32 << 20, 0), (8 << 20, 32 << 20)]
    r.close()
    with pytest.raises(HypervisorError):
        NbdReader(lambda h: None, "qemu:dirty-bitmap:nope", label="vda")


def test_file_reader_sparse(tmp_path: Path) -> None:
    p = tmp_path / "d.raw"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"\x11" * 65536)
    r = FileReader(str(p), label="vdb")
    ex = list(merge(r.extents()))
    assert sum(e.length for e in ex) == 8 << 20
    data = [e for e in ex if e.is_data]
    assert any(e.offset <= 1 << 20 < e.offset + e.length for e in data)
    assert sum(e.length for e in data) < 8 << 20  # holes are reported where the fs has them
    assert r.read(1 << 20, 4) == b"\x11" * 4
    assert r.read((8 << 20) - 2, 4) == b"\0" * 4  # zero-padded past EOF
    r.close()
    assert os.path.exists(p)
