"""The streaming disk writer: ``(offset, data)`` pieces in, a ``DiskRecord`` out.

Pieces must arrive in ascending offset order (they may have gaps and any alignment).
Chunks are hashed, deduplicated, compressed, encrypted and uploaded by a bounded pool
of threads, so memory stays bounded whatever the disk size and both cores are used
(BLAKE3, zstd and AES-GCM release the GIL).

Chunks the caller never touches keep their entry from ``base`` — the parent snapshot's
chunk list for an incremental (so every snapshot is a synthetic full), or holes for a
full backup. In a chunk that *is* touched, bytes not written are zero; callers that
reuse a parent must therefore write whole chunks (see :func:`chunk_ranges`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import ChunkList, DiskRecord, chunk_count
from vmdr.repository.repo import Repository

Progress = Callable[[int], None]


@dataclass
class WriteStats:
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    chunks_new: int = 0
    chunks_dedup: int = 0
    chunks_zero: int = 0
    reused_ids: set[bytes] = field(default_factory=set)

    def add(self, other: WriteStats) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_new += other.bytes_new
        self.bytes_stored += other.bytes_stored
        self.chunks_new += other.chunks_new
        self.chunks_dedup += other.chunks_dedup
        self.chunks_zero += other.chunks_zero
        self.reused_ids |= other.reused_ids

    def as_dict(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "bytes_new": self.bytes_new,
                "bytes_stored": self.bytes_stored, "chunks_new": self.chunks_new,
                "chunks_dedup": self.chunks_dedup, "chunks_zero": self.chunks_zero}


def chunk_ranges(
    extents: Iterable[tuple[int, int]], chunk_size: int, size: int
) -> Iterator[tuple[int, int]]:
    """Round extents out to chunk boundaries and merge them: ``(offset, length)``."""
    cur_start = cur_end = -1
    for off, length in sorted(extents):
        if length <= 0:
            continue
        s = off - off % chunk_size
        e = min(size, -(-(off + length) // chunk_size) * chunk_size)
        if s <= cur_end:
            cur_end = max(cur_end, e)
            continue
        if cur_end > cur_start:
            yield cur_start, cur_end - cur_start
        cur_start, cur_end = s, e
    if cur_end > cur_start:
        yield cur_start, cur_end - cur_start


class DiskWriter:
    def __init__(
        self, repo: Repository, name: str, size: int, fmt: str = "raw",
        base: ChunkList | None = None, executor: ThreadPoolExecutor | None = None,
        workers: int = 3, progress: Progress | None = None, meta: dict[str, Any] | None = None,
    ) -> None:
        self.repo = repo
        self.name, self.size, self.fmt = name, size, fmt
        self.meta = meta or {}
        self.cs = repo.chunk_size
        n = chunk_count(size, self.cs)
        self.chunks = base.resized(n) if base is not None else ChunkList.holes(n)
        self._base_ids = self.chunks.ids() if base is not None else set()
        self._touched: set[int] = set()
        self.stats = WriteStats()
        self._progress = progress
        self._own_pool = executor is None
        self._pool = executor or ThreadPoolExecutor(workers, thread_name_prefix="vmdr-chunk")
        self._slots = threading.BoundedSemaphore(workers + 1)  # one queued chunk per writer
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._futures: set[Future[None]] = set()
        self._cur_idx = -1
        self._cur: bytearray | None = None
        self._zero = bytes(self.cs)
        self._done = False
        repo.ensure_chunk_index()

    # ------------------------------------------------------------- input
    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Add *data* at *offset*; offsets must not go backwards."""
        self._raise_pending()
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write [{offset}, +{len(data)}) outside disk of {self.size} bytes")
        mv = memoryview(data)
        while mv:
            idx, within = divmod(offset, self.cs)
            clen = min(self.cs, self.size - idx * self.cs)
            n = min(len(mv), clen - within)
            if idx < self._cur_idx:
                raise ValueError("DiskWriter.write offsets must be ascending")
            if idx != self._cur_idx:
                self._flush_current()
                if within == 0 and n == clen:  # whole chunk: no copy
                    whole = data if isinstance(data, bytes) and len(mv) == len(data) == n \
                        else bytes(mv[:n])
                    self._submit(idx, whole)
                    mv, offset = mv[n:], offset + n
                    continue
                self._cur_idx, self._cur = idx, bytearray(clen)
            assert self._cur is not None
            self._cur[within : within + n] = mv[:n]
            mv, offset = mv[n:], offset + n
            if within + n == clen:
                self._flush_current()

    def _flush_current(self) -> None:
        if self._cur is not None:
            self._submit(self._cur_idx, bytes(self._cur))
            self._cur = None

    def _submit(self, idx: int, data: bytes) -> None:
        self._cur_idx = idx
        self._touched.add(idx)
        self._slots.acquire()
        try:
            fut = self._pool.submit(self._process, idx, data)
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._done_cb)

    def _done_cb(self, fut: Future[None]) -> None:
        self._slots.release()
        with self._lock:
            self._futures.discard(fut)
            exc = fut.exception()
            if exc is not None and self._error is None:
                self._error = exc

    def _process(self, idx: int, data: bytes) -> None:
        if self._error is not None:
            return
        n = len(data)
        if data == self._zero[:n]:
            oid, stored, new, zero = HOLE, 0, False, True
        else:
            zero = False
            oid = self.repo.codec.object_id(data)
            if self.repo.has_chunk(oid):
                stored, new = 0, False
            else:
                stored, new = self.repo.put_chunk(oid, data), True
        with self._lock:
            self.chunks[idx] = oid
            st = self.stats
            st.bytes_read += n
            if zero:
                st.chunks_zero += 1
            elif new:
                st.chunks_new += 1
                st.bytes_new += n
                st.bytes_stored += stored
            else:
                st.chunks_dedup += 1
                st.reused_ids.add(oid)
        if self._progress:
            self._progress(n)

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------- output
    def finish(self) -> DiskRecord:
        """Wait for every chunk; return the disk's record for the manifest."""
        self._flush_current()
        self._wait()
        self._raise_pending()
        self._done = True
        untouched = {self.chunks[i] for i in range(len(self.chunks)) if i not in self._touched}
        self.stats.reused_ids |= (untouched & self._base_ids) - {HOLE}
        return DiskRecord(self.name, self.size, self.chunks, self.fmt, dict(self.meta))

    def _wait(self) -> None:
        while True:
            with self._lock:
                pending = list(self._futures)
            if not pending:
                break
            for f in pending:
                try:
                    f.result()
                except BaseException:
                    pass
        if self._own_pool:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop early: let running chunks end, drop the rest."""
        if self._error is None:
            self._error = RuntimeError("aborted")
        self._cur = None
        self._wait()
