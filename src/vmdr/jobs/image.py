"""``vmdr image backup`` / ``vmdr image restore``: disk images, LVM volumes and block
devices on their own, outside libvirt."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from vmdr.diskio.images import open_source
from vmdr.errors import UsageError
from vmdr.events import JobEvents
from vmdr.jobs import diskcopy
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository


@dataclass
class ImageBackupResult:
    snapshot: Snapshot
    duration_s: float
    stats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot.id, "name": self.snapshot.name,
                "duration_s": round(self.duration_s, 3), **self.stats}


def _stat_key(path: str) -> dict[str, int] | None:
    """What identifies an unchanged regular file (borg's files-cache idea): device, inode,
    size, mtime and ctime in nanoseconds. ctime cannot be set back from user space, so a
    rewrite is always noticed. None for block devices, whose stat says nothing of content."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _unchanged_parent(repo: Repository, name: str, source: str,
                      key: dict[str, int] | None) -> Snapshot | None:
    if key is None:
        return None
    snaps = [s for s in repo.list_snapshots(name) if s.meta.get("kind") == "image"]
    if snaps and snaps[-1].meta.get("source") == source and snaps[-1].meta.get("stat") == key:
        return snaps[-1]
    return None


def backup_image(
    repo: Repository, path: str, name: str, tags: list[str] | None = None,
    events: JobEvents | None = None, workers: int = 3, force_read: bool = False,
) -> ImageBackupResult:
    """Back up one image file or block device. An image file whose device, inode, size,
    mtime and ctime equal the previous snapshot's is not read again (``force_read`` reads
    it anyway); its chunk list is reused."""
    ev = events or JobEvents()
    t0 = time.monotonic()
    source = os.path.abspath(path)
    disk_name = os.path.basename(path) or "disk"
    key_before = _stat_key(source) if os.path.exists(source) else None
    parent = None if force_read else _unchanged_parent(repo, name, source, key_before)
    if parent is not None:
        ev.phase("unchanged", f"{name}: {source} is unchanged since snapshot "
                 f"{parent.short_id}; not reading it again", name)
        rec = parent.disks[0]
        stats: dict[str, int] = {"bytes_read": 0, "bytes_new": 0, "bytes_stored": 0,
                                 "chunks_new": 0, "chunks_dedup": len(rec.chunks.ids()),
                                 "chunks_zero": 0}
        meta_extra = {"unchanged_since": parent.id}
        reused = rec.chunks.ids()
    else:
        with open_source(path) as src:
            extents = list(src.extents())
            ev.phase("read", "", name)
            rec, wstats = diskcopy.ingest(repo, disk_name, src.size, src.format, extents,
                                          src.read, progress=ev.progress(name),
                                          workers=workers)
        stats = wstats.as_dict()
        meta_extra = {}
        reused = wstats.reused_ids
        if key_before is not None and _stat_key(source) != key_before:
            key_before = None  # changed while we read it: never trust this snapshot's stat
    meta = {"kind": "image", "source": source, "stat": key_before, **meta_extra}
    snap = Snapshot(name=name, time=repo.clock(), chunk_size=repo.chunk_size, disks=[rec],
                    tags=list(tags or []), meta=meta, stats=stats)
    ev.phase("commit", "", name)
    repo.commit_snapshot(snap, reused, hint="run it again with --force-read")
    return ImageBackupResult(snap, time.monotonic() - t0, stats)


def restore_image(
    repo: Repository, snap: Snapshot, path: str, fmt: str = "raw", disk: str | None = None,
    overwrite: bool = False, events: JobEvents | None = None,
) -> dict[str, Any]:
    ev = events or JobEvents()
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
    ev.phase("write", "", rec.name)
    written = diskcopy.restore(repo, rec, path, fmt, overwrite, ev.progress(rec.name))
    return {"snapshot": snap.id, "disk": rec.name, "path": path, "format": fmt,
            "size": rec.size, "bytes_written": written,
            "duration_s": round(time.monotonic() - t0, 3)}
