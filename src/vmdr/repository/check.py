"""``vmdr check``: structure, and optionally the data itself.

Structure: config, key slots, every manifest decrypts and parses, every referenced chunk
exists. ``read_data``: every selected chunk is fetched, authenticated, decompressed and
re-hashed. Each problem names the snapshots (and disks) it damages.

Temporary objects left by killed writers (``*.tmp``, older than :data:`STALE_TEMP_AGE`)
are reported as warnings of kind ``stale-temp``: they waste space but damage nothing,
so they do not fail the check; ``vmdr prune`` removes them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from vmdr.errors import IntegrityError, ObjectNotFoundInRepo, StorageError, UnsupportedFormat
from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository, chunk_name

STALE_TEMP_AGE = timedelta(hours=1)  # no single object write takes this long


@dataclass
class Problem:
    kind: str  # missing-chunk, corrupt-chunk, corrupt-snapshot, corrupt-attachment, stale-temp
    object: str
    message: str
    damages: list[str] = field(default_factory=list)  # "name@shortid:disk"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "object": self.object, "message": self.message,
                "damages": self.damages}

    def line(self) -> str:
        dmg = f" — damages {', '.join(self.damages)}" if self.damages else ""
        return f"{self.kind}: {self.message}{dmg}"


@dataclass
class CheckResult:
    snapshots: int = 0
    chunks_referenced: int = 0
    chunks_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # harmless: stale-temp

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "snapshots": self.snapshots,
                "chunks_referenced": self.chunks_referenced, "chunks_read": self.chunks_read,
                "problems": [p.as_dict() for p in self.problems],
                "warnings": [p.as_dict() for p in self.warnings]}


def check(
    repo: Repository, read_data: float = 0.0, snapshot_ids: list[str] | None = None,
    progress: Callable[[int], None] | None = None, rng: random.Random | None = None,
    workers: int = 4,
) -> CheckResult:
    """Check the repository (or only *snapshot_ids*). *read_data* is a fraction 0..1."""
    res = CheckResult()
    users: dict[bytes, list[str]] = {}
    sids = snapshot_ids if snapshot_ids is not None else repo.snapshot_ids()
    snaps: list[Snapshot] = []
    for sid in sids:
        try:
            # from the repository itself: the cache is never the source of truth
            snaps.append(repo.load_snapshot(sid, use_cache=False))
        except (IntegrityError, UnsupportedFormat) as exc:
            res.problems.append(Problem("corrupt-snapshot", f"snapshots/{sid}",
                                        f"snapshot {sid}: {exc.message}", [sid[:8]]))
    res.snapshots = len(snaps)
    if snapshot_ids is None:
        for o in repo.stale_temporaries(STALE_TEMP_AGE.total_seconds()):
            res.warnings.append(Problem("stale-temp", o.name, f"stale temporary object "
                                        f"{o.name} ({o.size} bytes) left by a killed write; "
                                        "'vmdr prune' removes it"))
    for s in snaps:
        for d in s.disks:
            label = f"{s.name}@{s.short_id}:{d.name}"
            for oid in d.chunks.ids():
                lst = users.setdefault(oid, [])
                if not lst or lst[-1] != label:
                    lst.append(label)
    for s in snaps:  # attachments: protection and verification records
        try:
            repo.attachments(s.id)
        except (IntegrityError, UnsupportedFormat) as exc:
            res.problems.append(Problem("corrupt-attachment", f"attachments/{s.id}",
                                        exc.message, [f"{s.name}@{s.short_id}"]))
    users.pop(HOLE, None)
    res.chunks_referenced = len(users)
    present = {bytes.fromhex(o.name.rsplit("/", 1)[-1]) for o in repo.backend.list("data")}
    for oid, dmg in users.items():
        if oid not in present:
            res.problems.append(Problem("missing-chunk", chunk_name(oid),
                                        f"chunk {oid.hex()[:16]} is missing", dmg))
    if read_data > 0:
        todo = [oid for oid in users if oid in present]
        if read_data < 1:
            r = rng or random.Random()
            todo = [oid for oid in todo if r.random() < read_data]

        def verify(oid: bytes) -> Problem | None:
            try:
                data = repo.get_chunk(oid)
                if progress:
                    progress(len(data))
                return None
            except ObjectNotFoundInRepo as exc:
                return Problem("missing-chunk", chunk_name(oid), exc.message, users[oid])
            except (IntegrityError, UnsupportedFormat) as exc:
                return Problem("corrupt-chunk", chunk_name(oid), exc.message, users[oid])
            except StorageError as exc:
                return Problem("unreadable-chunk", chunk_name(oid), exc.message, users[oid])

        with ThreadPoolExecutor(workers) as pool:
            for p in pool.map(verify, todo):
                res.chunks_read += 1
                if p is not None:
                    res.problems.append(p)
    return res
