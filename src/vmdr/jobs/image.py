"""``vmdr image backup`` / ``vmdr image restore``: disk images, LVM volumes and block
devices on their own, outside libvirt."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from vmdr.diskio.images import open_source
from vmdr.errors import UsageError
from vmdr.jobs import diskcopy
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository
from vmdr.ui.progress import Progress


@dataclass
class ImageBackupResult:
    snapshot: Snapshot
    duration_s: float
    stats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.id, "name": self.snapshot.name,
                "duration_s": round(self.duration_s, 3), **self.stats}


def backup_image(
    repo: Repository, path: str, name: str, tags: list[str] | None = None,
    progress: Progress | None = None, workers: int = 3,
) -> ImageBackupResult:
    t0 = time.monotonic()
    disk_name = os.path.basename(path) or "disk"
    with open_source(path) as src:
        extents = list(src.extents())
        if progress:
            progress.set_total(sum(n for _, n in extents), f"{name}")
        rec, stats = diskcopy.ingest(repo, disk_name, src.size, src.format, extents, src.read,
                                     progress=progress, workers=workers)
    snap = Snapshot(name=name, time=repo.clock(), chunk_size=repo.chunk_size, disks=[rec],
                    tags=list(tags or []), meta={"kind": "image", "source": os.path.abspath(path)},
                    stats=stats.as_dict())
    repo.save_snapshot(snap)
    if progress:
        progress.finish()
    return ImageBackupResult(snap, time.monotonic() - t0, stats.as_dict())


def restore_image(
    repo: Repository, snap: Snapshot, path: str, fmt: str = "raw", disk: str | None = None,
    overwrite: bool = False, progress: Progress | None = None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    if disk is None:
        if len(snap.disks) != 1:
            names = ", ".join(d.name for d in snap.disks)
            raise UsageError(f"snapshot {snap.short_id} has several disks ({names}); pick --disk")
        rec = snap.disks[0]
    else:
        found = snap.disk(disk)
        if found is None:
            raise UsageError(f"snapshot {snap.short_id} has no disk {disk!r}")
        rec = found
    if progress:
        progress.set_total(rec.size, rec.name)
    written = diskcopy.restore(repo, rec, path, fmt, overwrite, progress)
    if progress:
        progress.finish()
    return {"snapshot": snap.id, "disk": rec.name, "path": path, "format": fmt,
            "size": rec.size, "bytes_written": written,
            "duration_s": round(time.monotonic() - t0, 3)}
