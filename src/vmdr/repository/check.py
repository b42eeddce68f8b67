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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from vmdr.errors import (
    IntegrityError,
    ObjectNotFoundInRepo,
    SnapshotNotFound,
    StorageError,
    UnsupportedFormat,
)
from vmdr.repository.crypto import HOLE
from vmdr.repository.idset import IdTable
from vmdr.repository.repo import Repository, chunk_name

T = TypeVar("T")
R = TypeVar("R")
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


def _labels(repo: Repository, sids: list[str], wanted: set[bytes]) -> dict[bytes, list[str]]:
    """Second pass, only for the problem chunks *wanted*: which snapshots (and disks) use
    each, as ``name@shortid:disk``, in the order of *sids*."""
    out: dict[bytes, list[str]] = {oid: [] for oid in wanted}
    if not wanted:
        return out
    for sid in sids:
        try:
            s = repo.load_snapshot(sid, use_cache=False)
        except (IntegrityError, UnsupportedFormat, SnapshotNotFound):
            continue  # reported by the first pass (or deleted since)
        for d in s.disks:
            label = f"{s.name}@{s.short_id}:{d.name}"
            for oid in d.chunks:
                lst = out.get(oid)
                if lst is not None and (not lst or lst[-1] != label):
                    lst.append(label)
    return out


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T],
                 limit: int) -> Iterator[R]:
    """``pool.map`` with at most *limit* calls in flight (a million futures would not)."""
    pending: deque[Future[R]] = deque()
    try:
        for it in items:
            pending.append(pool.submit(fn, it))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


def check(
    repo: Repository, read_data: float = 0.0, snapshot_ids: list[str] | None = None,
    progress: Callable[[int], None] | None = None, rng: random.Random | None = None,
    workers: int = 4,
) -> CheckResult:
    """Check the repository (or only *snapshot_ids*). *read_data* is a fraction 0..1.

    Memory stays flat however many chunks there are: manifests are read one at a time,
    the referenced and the present chunk IDs go into on-disk tables (:class:`IdTable`),
    and which snapshots a damaged chunk hurts is worked out afterwards, by a second pass
    over the manifests for the damaged chunks only."""
    res = CheckResult()
    sids = snapshot_ids if snapshot_ids is not None else repo.snapshot_ids()
    readable: list[str] = []
    labels: list[str] = []  # "name@shortid" of each readable snapshot
    with IdTable("vmdr-check-used-") as used, IdTable("vmdr-check-present-") as present:
        for sid in sids:
            try:
                # from the repository itself: the cache is never the source of truth
                snap = repo.load_snapshot(sid, use_cache=False)
            except (IntegrityError, UnsupportedFormat) as exc:
                res.problems.append(Problem("corrupt-snapshot", f"snapshots/{sid}",
                                            f"snapshot {sid}: {exc.message}", [sid[:8]]))
                continue
            readable.append(sid)
            labels.append(f"{snap.name}@{snap.short_id}")
            for d in snap.disks:
                used.add_many(oid for oid in d.chunks if oid != HOLE)
            del snap
        res.snapshots = len(readable)
        for sid, label in zip(readable, labels, strict=True):  # protection, verification
            try:
                repo.attachments(sid)
            except (IntegrityError, UnsupportedFormat) as exc:
                res.problems.append(Problem("corrupt-attachment", f"attachments/{sid}",
                                            exc.message, [label]))
        if snapshot_ids is None:
            for o in repo.stale_temporaries(STALE_TEMP_AGE.total_seconds()):
                res.warnings.append(Problem("stale-temp", o.name, f"stale temporary object "
                                            f"{o.name} ({o.size} bytes) left by a killed "
                                            "write; 'vmdr prune' removes it"))
        res.chunks_referenced = len(used)
        present.add_many(bytes.fromhex(o.name.rsplit("/", 1)[-1])
                         for o in repo.list_chunks())
        missing = used.missing_from(present)
        bad: list[tuple[str, bytes, str]] = [
            ("missing-chunk", oid, f"chunk {oid.hex()[:16]} is missing") for oid in missing]
        if read_data > 0:
            skip = set(missing)
            todo: Iterable[bytes] = (oid for oid in used if oid not in skip)
            if read_data < 1:
                r = rng or random.Random()
                todo = (oid for oid in todo if r.random() < read_data)

            def verify(oid: bytes) -> tuple[str, bytes, str] | None:
                try:
                    data = repo.get_chunk(oid)
                    if progress:
                        progress(len(data))
                    return None
                except ObjectNotFoundInRepo as exc:
                    return ("missing-chunk", oid, exc.message)
                except (IntegrityError, UnsupportedFormat) as exc:
                    return ("corrupt-chunk", oid, exc.message)
                except StorageError as exc:
                    return ("unreadable-chunk", oid, exc.message)

            with ThreadPoolExecutor(workers) as pool:
                for p in _bounded_map(pool, verify, todo, max(1, workers) * 4):
                    res.chunks_read += 1
                    if p is not None:
                        bad.append(p)
    users = _labels(repo, readable, {oid for _, oid, _ in bad})
    res.problems.extend(Problem(kind, chunk_name(oid), msg, list(users[oid]))
                        for kind, oid, msg in bad)
    return res
