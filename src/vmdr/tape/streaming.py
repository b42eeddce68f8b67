"""Write-behind for the drive: a thread of its own writes the blocks, so computing the
next frames' MACs (BLAKE3 releases the GIL) and reading the repository overlap with the
drive's writes instead of taking turns with them.

``WriteBehind`` wraps any ``TapeDrive``. ``write_block`` queues the block (at most *depth*
blocks are in flight: the drive's ``write_behind`` bytes, 8 MiB by default) and returns
at once; every other call first waits
until the queue is written, so positioning, filemarks and status see the drive as if the
writes had been synchronous. A write error is raised by the next call after it happened;
the blocks queued behind the failed one are dropped.

End of medium: ``write_block`` returns the early warning as soon as the drive thread has
seen it, which can be up to *depth* blocks late. The early warning zone of real drives is
far larger than 8 MiB. The virtual drive is written without one (``write_behind = 0``).

The drive thread hands whatever is queued (up to *batch* blocks) to ``write_gathered`` in
one call: one ``writev`` for the virtual drive; for real drives, whose block size is fixed
by the on-tape format, one write or SCSI command per block, joined in this thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

from vmdr.tape.drive import Block, DriveStatus, Segments, TapeDrive

_STOP = object()


class WriteBehind(TapeDrive):
    def __init__(self, inner: TapeDrive, depth: int | None = None, batch: int = 16) -> None:
        self.inner = inner
        self.block_size = inner.block_size
        if depth is None:
            depth = max(1, inner.write_behind // inner.block_size)  # 0: one block
        self.batch = min(batch, depth)
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._err: BaseException | None = None
        self._eom = False
        self.stalls = 0  # times the drive thread found nothing to write while streaming
        self.idle_seconds = 0.0  # how long it waited, in total, during those stalls
        self.busy_seconds = 0.0  # time spent in the drive's write calls
        self._streaming = False
        self._thread = threading.Thread(target=self._run, name="vmdr-tape-drive", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the drive thread
    def _run(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                if self._streaming:
                    self.stalls += 1
                t0 = time.monotonic()
                item = self._q.get()
                if self._streaming:
                    self.idle_seconds += time.monotonic() - t0
            if item is _STOP:
                self._q.task_done()
                return
            blocks: list[Segments] = [item]  # type: ignore[list-item]
            stop = False
            while len(blocks) < self.batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                blocks.append(nxt)  # type: ignore[arg-type]
            if self._err is None:
                t0 = time.monotonic()
                try:
                    if self.inner.write_gathered(blocks):
                        self._eom = True
                except BaseException as exc:  # raised in the caller's thread
                    self._err = exc
                self.busy_seconds += time.monotonic() - t0
            for _ in blocks:
                self._q.task_done()
            if stop:
                self._q.task_done()
                return

    # ------------------------------------------------------------------ the caller's side
    def _raise(self) -> None:
        if self._err is not None:
            err, self._err = self._err, None
            raise err

    def flush(self) -> None:
        """Wait until every queued block is on the drive; raise its error if one failed."""
        self._q.join()
        self._streaming = False
        self._raise()

    def write_block(self, data: Block) -> bool:
        return self.write_gathered([[data]])

    def write_gathered(self, blocks: Sequence[Segments]) -> bool:
        self._raise()
        self._streaming = True
        for segs in blocks:
            self._q.put(segs)
        return self._eom

    def status(self) -> DriveStatus:
        self.flush()
        return self.inner.status()

    def rewind(self) -> None:
        self.flush()
        self._eom = False
        self.inner.rewind()

    def forward_space_files(self, count: int) -> None:
        self.flush()
        self.inner.forward_space_files(count)

    def move_to_eod(self) -> int:
        self.flush()
        return self.inner.move_to_eod()

    def read_block(self) -> bytes | None:
        self.flush()
        return self.inner.read_block()

    def write_filemark(self) -> None:
        self.flush()
        self.inner.write_filemark()

    def position(self) -> int:
        self.flush()
        return self.inner.position()

    def unload(self) -> None:
        self.flush()
        self.inner.unload()

    def locate_file(self, number: int) -> None:
        self.flush()
        self.inner.locate_file(number)

    def stop(self) -> None:
        """Write what is queued and end the drive thread (the inner drive stays open)."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()
        self._raise()

    def close(self) -> None:
        self.stop()
        self.inner.close()
