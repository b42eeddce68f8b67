"""The drive's write-behind thread (src/vmdr/tape/streaming.py) and the gathered block
writes: order kept, positioning waits for the queue, a write error reaches the caller,
the early warning arrives, and the parallel prefetch of chunk objects stays bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmdr.errors import NoSpace
from vmdr.tape.drive import Block, DriveStatus, Segments, TapeDrive
from vmdr.tape.streaming import WriteBehind
from vmdr.tape.virtual import VirtualLibrary

BS = 256 << 10


def _lib(tmp: Path, capacity: int = 64 << 20, warn: int = 4 << 20) -> VirtualLibrary:
    vl = VirtualLibrary.create(tmp / "vtl", slots=2, ie_slots=0, capacity=capacity,
                               early_warning=warn)
    vl.add_tape("VMD001L8", 1)
    vl.changer().load(1)
    return vl


def test_gathered_blocks_land_in_order_and_positioning_waits(tmp_path: Path) -> None:
    vl = _lib(tmp_path)
    inner = vl.drive()
    wb = WriteBehind(inner)
    blocks = [bytes([i]) * BS for i in range(40)]
    for i, b in enumerate(blocks):
        # pieces of a block, as the archive writer hands them over
        mv = memoryview(b)
        wb.write_gathered([[mv[:100], mv[100:BS // 2], mv[BS // 2:]]] if i % 2 else [[b]])
    wb.write_filemark()  # waits for the queue first
    assert wb.position() == 1
    wb.rewind()
    got = []
    while (blk := wb.read_block()) is not None:
        got.append(blk)
    assert got == blocks
    wb.close()


def test_early_warning_reaches_the_writer_within_the_queue(tmp_path: Path) -> None:
    vl = _lib(tmp_path, capacity=16 << 20, warn=4 << 20)
    drive = vl.drive()
    assert drive.write_behind == 0  # the job writes the virtual drive directly
    wb = WriteBehind(drive, depth=4)  # 1 MiB: a quarter of the warning zone
    n = 0
    while not wb.write_block(bytes(BS)):
        n += 1
        assert n < 64
    # warned before the physical end, with room to close the file
    assert n * BS <= (16 << 20) - (4 << 20) + (1 << 20) + BS
    wb.flush()
    wb.close()


class _Failing(TapeDrive):
    """Fails the 5th block; slow writes so the queue fills."""

    def __init__(self) -> None:
        self.n = 0

    def status(self) -> DriveStatus:
        return DriveStatus(True, True)

    def rewind(self) -> None: ...
    def forward_space_files(self, count: int) -> None: ...
    def move_to_eod(self) -> int:
        return 0

    def read_block(self) -> bytes | None:
        return None

    def write_block(self, data: Block) -> bool:
        time.sleep(0.01)
        self.n += 1
        if self.n == 5:
            raise NoSpace("tape full (test)")
        return False

    def write_gathered(self, blocks: Sequence[Segments]) -> bool:
        for b in blocks:
            self.write_block(b"".join(b))
        return False

    def write_filemark(self) -> None: ...
    def position(self) -> int:
        return 0


def test_a_write_error_reaches_the_caller() -> None:
    wb = WriteBehind(_Failing(), depth=2)
    with pytest.raises(NoSpace):
        for _ in range(50):
            wb.write_block(b"x")
        wb.flush()
    wb.stop()


def test_prefetch_is_bounded() -> None:
    """_objects never has more than *ahead* reads in flight past the consumer."""
    from types import SimpleNamespace

    from vmdr.jobs.tape import _objects

    started: list[int] = []
    lock = threading.Lock()

    class Repo:
        def get_raw_chunk(self, oid: bytes) -> bytes:
            with lock:
                started.append(oid[0])
            return oid

        def get_raw_snapshot(self, sid: str) -> bytes:
            return b"snap"

    ids = [bytes([i]) * 32 for i in range(1, 101)]
    snap = SimpleNamespace(id="ab" * 32, disks=[SimpleNamespace(chunks=ids)])
    it = _objects(Repo(), [snap], workers=4, ahead=8)  # type: ignore[arg-type, list-item]
    first = next(it)
    time.sleep(0.2)
    assert first[1] == ids[0] and len(started) <= 9
    rest = list(it)
    assert [o for _, o, _ in rest[:-1]] == ids[1:] and rest[-1][2] == b"snap"
