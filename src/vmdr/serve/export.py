"""One served disk: random reads over a snapshot's chunks, a shared cache, read-ahead.

This is the engine behind the nbdkit plugin (:mod:`vmdr.serve.plugin`), kept free of
nbdkit so it can be unit-tested. It is thread-safe: nbdkit calls it from many worker
threads and several client connections at once (``nbdcopy`` opens four).

* **Cache.** Decoded chunks live in an LRU of ``cache_chunks`` entries shared by every
  connection. An entry is a future, so two readers of the same chunk fetch it once.
* **Read-ahead.** A read that continues where an earlier one ended (chunk ``i`` after
  chunk ``i-1``) is sequential: the next ``readahead`` chunks are fetched in the
  background by ``workers`` threads. Random reads fetch only what they need.
* **Holes.** A hole chunk is never fetched; it reads as zeros and :meth:`extents`
  reports it as a hole, so clients (``nbdcopy``, ``qemu-img``) skip it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from vmdr.errors import IntegrityError
from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import DiskRecord
from vmdr.repository.repo import Repository


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    hole: bool


class ServedDisk:
    """Random access to one disk of a snapshot, for many concurrent readers."""

    def __init__(
        self, repo: Repository, disk: DiskRecord, *, cache_chunks: int = 24,
        readahead: int = 6, workers: int = 4,
    ) -> None:
        self.repo = repo
        self.disk = disk
        self.size = disk.size
        self.cs = repo.chunk_size
        self.readahead = max(0, readahead)
        self._max = max(2, cache_chunks, self.readahead + 2)
        self._cache: OrderedDict[int, Future[bytes | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._recent: OrderedDict[int, None] = OrderedDict()  # last chunks read, for streams
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="vmdr-serve")
        self.fetched = 0  # chunks decoded (for tests and stats)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ chunks
    def _decode(self, idx: int) -> bytes | None:
        oid = self.disk.chunks[idx]
        if oid == HOLE:
            return None
        data = self.repo.get_chunk(oid)
        want = min(self.cs, self.size - idx * self.cs)
        if len(data) != want:
            raise IntegrityError(f"chunk {oid.hex()[:16]} of disk {self.disk.name} has the "
                                 "wrong length")
        self.fetched += 1
        return data

    def _future(self, idx: int) -> Future[bytes | None]:
        """The cached (or newly submitted) fetch of chunk *idx*; call with the lock held."""
        fut = self._cache.get(idx)
        if fut is not None:
            self._cache.move_to_end(idx)
            return fut
        fut = self._pool.submit(self._decode, idx)
        self._cache[idx] = fut
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return fut

    def _note_access(self, idx: int) -> None:
        """Start read-ahead when *idx* continues a stream; call with the lock held."""
        sequential = (idx - 1) in self._recent
        self._recent[idx] = None
        self._recent.move_to_end(idx)
        while len(self._recent) > 64:
            self._recent.popitem(last=False)
        if not sequential or not self.readahead:
            return
        last = min(len(self.disk.chunks), idx + 1 + self.readahead)
        for nxt in range(idx + 1, last):
            if nxt not in self._cache and self.disk.chunks[nxt] != HOLE:
                self._future(nxt)

    def chunk(self, idx: int) -> bytes | None:
        """Chunk *idx* decoded (``None`` for a hole), through the cache."""
        if self.disk.chunks[idx] == HOLE:
            with self._lock:
                self._note_access(idx)
            return None
        with self._lock:
            fut = self._future(idx)
            self._note_access(idx)
        try:
            return fut.result()
        except BaseException:
            with self._lock:
                if self._cache.get(idx) is fut:
                    del self._cache[idx]  # let the next reader retry
            raise

    # ------------------------------------------------------------------ NBD operations
    def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill *buf* with the disk's bytes at *offset* (zeros past the end never asked)."""
        view = memoryview(buf).cast("B")
        n = len(view)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} bytes at {offset} is outside the disk")
        pos = 0
        while pos < n:
            idx, within = divmod(offset + pos, self.cs)
            take = min(n - pos, self.cs - within)
            data = self.chunk(idx)
            if data is None:
                view[pos : pos + take] = bytes(take)
            else:
                view[pos : pos + take] = memoryview(data)[within : within + take]
            pos += take

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return bytes(buf)

    def extents(self, offset: int, count: int) -> list[Extent]:
        """Data and hole extents covering ``[offset, offset+count)``, merged, chunk-aligned
        except for the first (which starts at *offset*) and the last (clipped at the end)."""
        end = min(self.size, offset + max(1, count))
        out: list[Extent] = []
        pos = offset
        while pos < end:
            idx = pos // self.cs
            nxt = min(self.size, (idx + 1) * self.cs)
            hole = self.disk.chunks[idx] == HOLE
            if out and out[-1].hole == hole:
                last = out[-1]
                out[-1] = Extent(last.offset, nxt - last.offset, hole)
            else:
                out.append(Extent(pos, nxt - pos, hole))
            pos = nxt
        return out
