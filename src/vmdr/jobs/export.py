"""``vmdr export``: a snapshot as one stream for other backup software (Bareos, NetBackup,
TSM) to put on its own tapes.

- ``raw``: one disk as a raw image (``--disk`` for a multi-disk snapshot); to a file it
  is sparse, to stdout holes are zeros.
- ``qcow2``: one disk as a qcow2 image; a file only (qcow2 cannot be streamed).
- ``tar``: ``snapshot.json`` (the summary), ``domain.xml`` (when the snapshot has one) and
  ``disks/NAME.raw`` for every disk, as a POSIX tar stream; raw disks at full size.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from typing import IO, Any

from vmdr.errors import UsageError
from vmdr.events import ItemProgress, JobEvents
from vmdr.jobs.image import restore_image
from vmdr.repository.manifest import DiskRecord, Snapshot
from vmdr.repository.reader import DiskReader
from vmdr.repository.repo import Repository

FORMATS = ("raw", "qcow2", "tar")


def _pick(snap: Snapshot, disk: str | None) -> DiskRecord:
    if disk is None:
        if len(snap.disks) != 1:
            names = ", ".join(d.name for d in snap.disks)
            raise UsageError(f"snapshot {snap.short_id} has several disks ({names}); pick "
                             "--disk, or export --format tar")
        return snap.disks[0]
    rec = snap.disk(disk)
    if rec is None:
        raise UsageError(f"snapshot {snap.short_id} has no disk {disk!r}")
    return rec


def _disk_bytes(repo: Repository, rec: DiskReader, progress: ItemProgress
                ) -> Iterator[bytes]:
    for i, data in rec.iter_chunks(progress=progress.advance):
        yield data if data is not None else bytes(rec.chunk_length(i))


class _ChunkStream(io.RawIOBase):
    """A disk as a readable file object (for tarfile)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def export_snapshot(repo: Repository, snap: Snapshot, fmt: str, out_path: str | None,
                    out_stream: IO[bytes] | None, disk: str | None = None,
                    force: bool = False, events: JobEvents | None = None) -> dict[str, Any]:
    """Write *snap* to *out_path*, or to *out_stream* (stdout) when the path is ``-``."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} ({', '.join(FORMATS)})")
    t0 = time.monotonic()
    ev = events or JobEvents()
    to_stream = out_path in (None, "-")
    if fmt in ("raw", "qcow2") and not to_stream:
        assert out_path is not None
        res = restore_image(repo, snap, out_path, fmt, _pick(snap, disk).name, force, ev)
        return {**res, "snapshot": snap.id, "format": fmt}
    if fmt == "qcow2":
        raise UsageError("qcow2 cannot be written to a pipe: give -o FILE, or use raw or tar")
    if not to_stream:
        assert out_path is not None
        if os.path.exists(out_path) and not force:
            raise UsageError(f"{out_path} exists (--force overwrites it)")
        with open(out_path, "wb") as fh:
            return export_snapshot(repo, snap, fmt, "-", fh, disk, force, ev)
    assert out_stream is not None
    if fmt == "raw":
        rec = _pick(snap, disk)
        progress = ev.progress(rec.name, rec.size)
        for data in _disk_bytes(repo, DiskReader(repo, rec), progress):
            out_stream.write(data)
        out_stream.flush()
        total = rec.size
        progress.finish()
    else:
        progress = ev.progress(snap.name, sum(d.size for d in snap.disks))
        total = _write_tar(repo, snap, out_stream, progress)
        progress.finish()
    return {"snapshot": snap.id, "format": fmt, "path": out_path or "-", "bytes": total,
            "duration_s": round(time.monotonic() - t0, 3)}


def _write_tar(repo: Repository, snap: Snapshot, stream: IO[bytes],
               progress: ItemProgress) -> int:
    total = 0
    mtime = snap.time.timestamp()
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o600
            tar.addfile(info, io.BytesIO(data))

        add("snapshot.json", json.dumps(snap.summary(), indent=1).encode())
        xml = (snap.meta.get("config") or {}).get("domain_xml") or snap.meta.get("domain_xml")
        if xml:
            add("domain.xml", str(xml).encode())
        for rec in snap.disks:
            info = tarfile.TarInfo(f"disks/{rec.name}.raw")
            info.size, info.mtime, info.mode = rec.size, mtime, 0o600
            reader = DiskReader(repo, rec)
            tar.addfile(info, io.BufferedReader(_ChunkStream(
                _disk_bytes(repo, reader, progress)), 4 << 20))
            total += rec.size
    stream.flush()
    return total
