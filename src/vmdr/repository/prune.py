"""Mark-and-sweep garbage collection with a safety window (format.md §9).

Marking goes into an on-disk SQLite table (:class:`~vmdr.repository.idset.IdTable`),
one manifest at a time, and so does the list of deleted chunks: memory stays bounded for
millions of chunks. Only unreferenced chunks older than the safety window are deleted: chunks that
a running backup uploaded but has not yet referenced from a manifest survive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from vmdr.errors import IntegrityError, ObjectNotFound, UnsupportedFormat
from vmdr.repository.crypto import HOLE
from vmdr.repository.idset import IdTable
from vmdr.repository.repo import Repository

DEFAULT_SAFETY_WINDOW = timedelta(hours=6)


@dataclass
class PruneResult:
    referenced: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    kept_young: int = 0
    orphan_attachments: int = 0
    stale_temps: int = 0
    dry_run: bool = False
    deleted_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"referenced_chunks": self.referenced, "deleted_chunks": self.deleted,
                "deleted_bytes": self.deleted_bytes, "kept_young_unreferenced": self.kept_young,
                "orphan_attachments": self.orphan_attachments,
                "stale_temporaries": self.stale_temps, "dry_run": self.dry_run}


def prune(
    repo: Repository, safety_window: timedelta = DEFAULT_SAFETY_WINDOW, dry_run: bool = False,
    on_delete: Callable[[str], None] | None = None,
) -> PruneResult:
    """Delete chunks no snapshot references. The caller holds the exclusive lock."""
    res = PruneResult(dry_run=dry_run)
    now = repo.clock().timestamp()
    with IdTable("vmdr-prune-used-") as used, IdTable("vmdr-prune-gone-") as deleted:
        sids = set(repo.snapshot_ids())
        for sid in sids:
            try:
                snap = repo.load_snapshot(sid)  # a cached copy is checked against its ID
            except (IntegrityError, UnsupportedFormat) as exc:
                raise IntegrityError(
                    f"prune stopped, nothing deleted: snapshot {sid} cannot be read "
                    f"({exc.message}), so the chunks it uses cannot be told from garbage; "
                    f"copy it back from another repository, or remove snapshots/{sid} "
                    "by hand if it is lost") from None
            for d in snap.disks:
                used.add_many(oid for oid in d.chunks if oid != HOLE)
            del snap  # one manifest in memory at a time
        res.referenced = len(used)
        for obj in repo.list_chunks():
            oid = bytes.fromhex(obj.name.rsplit("/", 1)[-1])
            if oid in used:
                continue
            if now - obj.mtime < safety_window.total_seconds():
                res.kept_young += 1
                continue
            res.deleted += 1
            res.deleted_bytes += obj.size
            if not dry_run:
                try:
                    repo.backend.delete(obj.name)
                except ObjectNotFound:
                    pass
                deleted.add(oid)
                if on_delete:
                    on_delete(obj.name)
        for obj in repo.backend.list("attachments"):
            if obj.name.split("/")[1] not in sids:
                res.orphan_attachments += 1
                if not dry_run:
                    repo.backend.delete(obj.name)
        # temporary objects of writes killed before their rename, older than the window
        for obj in repo.stale_temporaries(safety_window.total_seconds()):
            res.stale_temps += 1
            if not dry_run:
                try:
                    repo.backend.delete(obj.name)
                except ObjectNotFound:
                    pass
        if not dry_run and res.deleted:
            repo.bump_generation()
            if repo.cache:
                repo.cache.discard_chunks(iter(deleted))
                repo.cache.sync_generation(repo.generation())
        return res
