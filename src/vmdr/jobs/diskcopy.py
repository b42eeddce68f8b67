"""Moving one disk between a reader of bytes and the repository, in either direction.

Shared by image backup/restore and by VM backup/restore.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from vmdr.diskio.images import RawTarget, Target, aligned_buffer, open_target
from vmdr.errors import VmdrError
from vmdr.events import ItemProgress
from vmdr.repository.manifest import ChunkList, DiskRecord
from vmdr.repository.reader import DiskReader
from vmdr.repository.repo import Repository
from vmdr.repository.writer import DiskWriter, WriteStats, chunk_ranges

ReadFn = Callable[[int, int], bytes]


def ingest(
    repo: Repository, name: str, size: int, fmt: str, extents: Iterable[tuple[int, int]],
    read: ReadFn, base: ChunkList | None = None, progress: ItemProgress | None = None,
    workers: int = 3, meta: dict[str, object] | None = None,
) -> tuple[DiskRecord, WriteStats]:
    """Read *extents* (rounded out to whole chunks) with *read* into a new disk record.

    With *base*, chunks outside the extents keep the base's IDs (an incremental that is
    a synthetic full); without, they are holes. *progress* counts the bytes read (its
    total: the extents rounded out to chunks) and gets its final event on success.
    """
    ranges = list(chunk_ranges(extents, repo.chunk_size, size))
    if progress:
        progress.set_total(sum(n for _, n in ranges))
    writer = DiskWriter(repo, name, size, fmt, base=base, workers=workers,
                        progress=progress.advance if progress else None, meta=meta)
    try:
        piece = repo.chunk_size  # one chunk per read keeps memory small
        for off, length in ranges:
            end = off + length
            while off < end:
                n = min(piece, end - off)
                data = read(off, n)
                if len(data) != n:
                    raise VmdrError(f"disk {name}: short read at offset {off}")
                writer.write(off, data)
                off += n
        done = writer.finish(), writer.stats
        if progress:
            progress.finish()
        return done
    except BaseException:
        writer.abort()
        raise


def restore(
    repo: Repository, disk: DiskRecord, path: str, fmt: str = "raw", overwrite: bool = False,
    progress: ItemProgress | None = None, workers: int = 4,
) -> int:
    """Write *disk* to a new sparse image at *path*; return bytes written (non-zero data).

    Raw targets are written by the fetching threads themselves (``pwrite`` at independent
    offsets), so reading, decryption, decompression and writing overlap across cores.
    Each thread decodes into its own page-aligned buffer (no per-chunk allocation) and
    writes it from there with ``O_DIRECT`` where the filesystem allows (no page-cache
    copy); a chunk is written only after its MAC and its ID have been checked. The image is
    written under a temporary name and renamed into place when complete (see
    :mod:`vmdr.diskio.images`): nothing half-restored ever sits at *path*.
    *progress* counts the disk's bytes (its total: the disk size) and ends on success.
    """
    if progress:
        progress.set_total(disk.size)
    target: Target = open_target(path, disk.size, fmt, overwrite)
    reader = DiskReader(repo, disk, workers=workers)
    zero = bytes(repo.chunk_size)
    ok = False

    def put(idx: int, data: bytes | None) -> int:
        off = idx * repo.chunk_size
        if data is None or data == zero[: len(data)]:
            if isinstance(target, RawTarget):
                target.write_zeroes(off, reader.chunk_length(idx))
            n = 0
        else:
            target.write(off, data)
            n = len(data)
        if progress:
            progress.advance(reader.chunk_length(idx))
        return n

    try:
        if isinstance(target, RawTarget):
            written = _parallel(range(len(disk.chunks)),
                                _raw_writer(repo, reader, target, progress), workers)
        else:
            written = sum(put(i, data) for i, data in reader.iter_chunks())
        target.close()
        ok = True
        if progress:
            progress.finish()
        return written
    finally:
        if not ok:
            target.abort()  # removes the temporary file; an older file at path stays


def _raw_writer(repo: Repository, reader: DiskReader, target: RawTarget,
                progress: ItemProgress | None) -> Callable[[int], int]:
    """The per-chunk step of a raw restore, run on the pool's threads."""
    cs = repo.chunk_size
    lengths = {reader.chunk_length(len(reader.disk.chunks) - 1), cs} if reader.disk.chunks \
        else set()
    # a stored all-zero chunk (none since holes were recognised, but allowed) is a hole:
    # known by its ID, so it is neither fetched nor written
    zero_ids = {repo.codec.object_id(bytes(n)) for n in lengths}
    local = threading.local()

    def step(idx: int) -> int:
        n = reader.chunk_length(idx)
        if reader.disk.chunks[idx] in zero_ids:
            target.write_zeroes(idx * cs, n)
            written = 0
        else:
            buf: memoryview | None = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = aligned_buffer(cs)
            if reader.chunk_into(idx, buf):
                target.write_from(idx * cs, buf[:n])
                written = n
            else:
                target.write_zeroes(idx * cs, n)
                written = 0
        if progress:
            progress.advance(n)
        return written

    return step


def _parallel(items: Iterable[int], fn: Callable[[int], int], workers: int) -> int:
    """Run *fn* over *items* on *workers* threads with at most 2×workers queued; sum."""
    total = 0
    slots = threading.BoundedSemaphore(workers * 2)
    with ThreadPoolExecutor(workers, thread_name_prefix="vmdr-restore") as pool:
        futs: list[Future[int]] = []

        def release(_: Future[int]) -> None:
            slots.release()

        try:
            for item in items:
                slots.acquire()
                f = pool.submit(fn, item)
                f.add_done_callback(release)
                futs.append(f)
                if len(futs) >= 64:
                    pending = []
                    for x in futs:
                        if x.done():
                            total += x.result()
                        else:
                            pending.append(x)
                    futs = pending
            for x in futs:
                total += x.result()
        except BaseException:
            for x in futs:
                x.cancel()
            raise
    return total
