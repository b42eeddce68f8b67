"""Streaming a disk back out of the repository, in order, with parallel fetch."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import DiskRecord
from vmdr.repository.repo import Repository


class DiskReader:
    """Read one disk of a snapshot."""

    def __init__(
        self, repo: Repository, disk: DiskRecord, workers: int = 4, cache_chunks: int = 8
    ) -> None:
        self.repo = repo
        self.disk = disk
        self.cs = repo.chunk_size
        self.size = disk.size
        self.workers = workers
        self._lru: OrderedDict[int, bytes] = OrderedDict()
        self._lru_max = cache_chunks
        self._lock = threading.Lock()

    def chunk_length(self, idx: int) -> int:
        return min(self.cs, self.size - idx * self.cs)

    def chunk(self, idx: int) -> bytes | None:
        """Chunk *idx*'s bytes, or ``None`` for a hole."""
        oid = self.disk.chunks[idx]
        if oid == HOLE:
            return None
        data = self.repo.get_chunk(oid)
        if len(data) != self.chunk_length(idx):
            from vmdr.errors import IntegrityError

            raise IntegrityError(f"chunk {oid.hex()[:16]} of disk {self.disk.name} has the "
                                 "wrong length")
        return data

    def chunk_into(self, idx: int, out: memoryview) -> bool:
        """Decode chunk *idx* into ``out[:chunk_length(idx)]``; ``False`` for a hole (then
        *out* is untouched). Raises ``IntegrityError`` for a chunk of the wrong length."""
        oid = self.disk.chunks[idx]
        if oid == HOLE:
            return False
        self.repo.get_chunk_into(oid, out[: self.chunk_length(idx)])
        return True

    def iter_chunks(
        self, indices: Iterator[int] | None = None, progress: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, bytes | None]]:
        """Yield ``(index, data-or-None)`` in order; fetches up to 2×workers ahead."""
        idxs = iter(indices if indices is not None else range(len(self.disk.chunks)))
        window: deque[tuple[int, Future[bytes | None] | None]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="vmdr-read") as pool:
            def fill() -> None:
                while len(window) < self.workers * 2:
                    i = next(idxs, None)
                    if i is None:
                        return
                    hole = self.disk.chunks[i] == HOLE
                    window.append((i, None if hole else pool.submit(self.chunk, i)))
            try:
                fill()
                while window:
                    i, fut = window.popleft()
                    data = fut.result() if fut is not None else None
                    fill()
                    if progress:
                        progress(self.chunk_length(i))
                    yield i, data
            finally:
                for _, f in window:
                    if f is not None:
                        f.cancel()

    def read(self, offset: int, length: int) -> bytes:
        """Random access (for NBD serving); keeps a small LRU of decoded chunks."""
        out = bytearray()
        end = min(self.size, offset + length)
        while offset < end:
            idx, within = divmod(offset, self.cs)
            n = min(end - offset, self.chunk_length(idx) - within)
            with self._lock:
                data = self._lru.get(idx)
                if data is not None:
                    self._lru.move_to_end(idx)
            if data is None:
                got = self.chunk(idx)
                data = got if got is not None else b""
                with self._lock:
                    self._lru[idx] = data
                    if len(self._lru) > self._lru_max:
                        self._lru.popitem(last=False)
            if data:
                out += data[within : within + n]
            else:
                out += bytes(n)
            offset += n
        return bytes(out)
