"""``vmdr copy``: copy snapshots, and only the chunks the destination lacks, between two
repositories of any kind (docs/format.md §10, docs/operations.md "Offsite copies").

Two modes, chosen automatically:

* **raw** — both repositories share key material (``repo init --from-repo``, or both are
  unencrypted): chunks, manifests and attachments are copied as stored bytes; object IDs
  and snapshot IDs are identical on both sides.
* **re-encrypt** — different keys: every chunk is decrypted and verified with the source
  key, then encrypted under the destination key (new IDs). Manifests are rewritten with
  the new IDs and record ``meta.copied_from = {"repository", "snapshot"}``.

Both modes need equal chunk sizes. Every object is checked with the destination's key
before it is stored (``put_raw_chunk``), a snapshot's chunks are all stored before its
manifest, and a copy that is interrupted resumes without re-sending: chunks the
destination holds and snapshots it already has are skipped.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from vmdr.errors import SnapshotNotFound, UsageError
from vmdr.events import ItemProgress, JobEvents
from vmdr.jobs.copymap import ChunkMap
from vmdr.repository.crypto import HOLE, TYPE_CHUNK
from vmdr.repository.idset import IdTable
from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot
from vmdr.repository.repo import Repository
from vmdr.timeutil import format_time

log = logging.getLogger(__name__)
PROBE = b"vmdr-probe"
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class CopyOptions:
    names: Sequence[str] = ()  # snapshot names (globs) or NAME@ID refs; empty = all
    latest: int | None = None  # only the latest N per name
    workers: int = 4


@dataclass
class SnapshotCopy:
    name: str
    time: str
    source_id: str
    id: str
    status: str  # "copied" or "present"
    chunks_sent: int = 0
    bytes_sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CopyResult:
    source: str
    destination: str
    mode: str
    snapshots: list[SnapshotCopy] = field(default_factory=list)
    chunks_sent: int = 0
    chunks_present: int = 0
    bytes_sent: int = 0
    attachments_copied: int = 0
    duration_s: float = 0.0

    @property
    def copied(self) -> list[SnapshotCopy]:
        return [s for s in self.snapshots if s.status == "copied"]

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "mode": self.mode,
                "snapshots": [s.as_dict() for s in self.snapshots],
                "copied": len(self.copied), "present": len(self.snapshots) - len(self.copied),
                "chunks_sent": self.chunks_sent, "chunks_present": self.chunks_present,
                "bytes_sent": self.bytes_sent, "attachments_copied": self.attachments_copied,
                "duration_s": round(self.duration_s, 3)}


def shares_key(src: Repository, dst: Repository) -> bool:
    """Whether objects of *src* are valid stored objects of *dst* as they are."""
    return (src.encrypted == dst.encrypted
            and src.codec.object_id(PROBE) == dst.codec.object_id(PROBE))


def select(src: Repository, names: Sequence[str], latest: int | None) -> list[Snapshot]:
    """The source snapshots to copy, oldest first: headers only (their chunk lists are
    loaded one snapshot at a time, when it is copied)."""
    snaps = src.list_snapshots(chunks=False)
    if names:
        chosen: dict[str, Snapshot] = {}
        for pat in names:
            if "@" in pat:
                s = src.resolve(pat)
                chosen[s.id] = s
                continue
            hits = [s for s in snaps if fnmatch.fnmatchcase(s.name, pat)]
            if not hits and re.fullmatch(r"[0-9a-f]{4,64}", pat):  # an ID prefix
                hits = [src.resolve(pat)]
            if not hits:  # a glob that matches nothing is a typo too, not "nothing to do"
                what = "matches" if any(c in pat for c in "*?[") else "named"
                raise SnapshotNotFound(f"no snapshot {what} {pat!r} in {src.backend.display_url}")
            chosen.update((s.id, s) for s in hits)
        snaps = sorted(chosen.values(), key=lambda s: (s.time, s.id))
    if latest is not None:
        if latest < 1:
            raise UsageError("--latest must be at least 1")
        by_name: dict[str, list[Snapshot]] = {}
        for s in snaps:
            by_name.setdefault(s.name, []).append(s)
        snaps = sorted((s for group in by_name.values() for s in group[-latest:]),
                       key=lambda s: (s.time, s.id))
    return snaps


def _present_index(src: Repository, dst: Repository) -> dict[str, str]:
    """Source snapshot ID → destination snapshot ID, for snapshots already copied."""
    out: dict[str, str] = {}
    for s in dst.list_snapshots(chunks=False):
        out[s.id] = s.id  # identical ID: shared keys
        cf = s.meta.get("copied_from")
        if isinstance(cf, dict) and cf.get("repository") == src.id and cf.get("snapshot"):
            out[str(cf["snapshot"])] = s.id
    # a snapshot that came from the destination originally
    for s in src.list_snapshots(chunks=False):
        cf = s.meta.get("copied_from")
        if isinstance(cf, dict) and cf.get("repository") == dst.id and cf.get("snapshot") in out:
            out.setdefault(s.id, str(cf["snapshot"]))
    return out


def _chunk_lengths(snap: Snapshot) -> Iterator[tuple[bytes, int]]:
    """(chunk ID, plain length) of every non-hole reference of *snap*, repeats included."""
    cs = snap.chunk_size
    for d in snap.disks:
        for i, oid in enumerate(d.chunks):
            if oid != HOLE:
                yield oid, min(cs, d.size - i * cs)


class _Mapped:
    """The destination IDs of a snapshot's chunks, re-iterable and never held as a set:
    the commit re-checks them only when a prune ran meanwhile."""

    def __init__(self, snap: Snapshot, done: IdTable) -> None:
        self.snap, self.done = snap, done

    def __iter__(self) -> Iterator[bytes]:
        for d in self.snap.disks:
            for oid in d.chunks:
                if oid != HOLE:
                    yield cast(bytes, self.done.get(oid))


def _bounded(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], limit: int,
             handle: Callable[[T, R], None]) -> None:
    """Run *fn* over *items* with at most *limit* in flight; results handled in order
    in this thread. On the first error the rest is cancelled and the error raised."""
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for it in items:
            pending.append((it, pool.submit(fn, it)))
            if len(pending) >= limit:
                item, fut = pending.popleft()
                handle(item, fut.result())
        while pending:
            item, fut = pending.popleft()
            handle(item, fut.result())
    finally:
        for _, fut in pending:
            fut.cancel()


class _Copier:
    def __init__(self, src: Repository, dst: Repository, opts: CopyOptions,
                 events: JobEvents) -> None:
        self.src, self.dst, self.opts, self.events = src, dst, opts, events
        self.progress: ItemProgress = events.progress("copy")
        self.raw = shares_key(src, dst)
        self.map = None if self.raw else ChunkMap(src.id, dst.id)
        # source ID → destination ID (None: the same) of every chunk handled this run; on
        # disk, so a copy of a million chunks does not keep 150 MB of IDs in memory
        self.done: IdTable  # made by run()
        self.result = CopyResult(src.backend.display_url, dst.backend.display_url,
                                 "raw" if self.raw else "re-encrypt")

    # -- one chunk (worker threads) ---------------------------------------------------
    def _chunk(self, oid: bytes) -> tuple[bytes, int]:
        """Make sure the destination holds chunk *oid*; return (its ID there, bytes sent)."""
        src, dst = self.src, self.dst
        if self.raw:
            if dst.has_chunk(oid):
                return oid, 0
            blob = src.get_raw_chunk(oid)
            dst.put_raw_chunk(oid, blob)  # checks the tag and ID with the destination key
            return oid, len(blob)
        assert self.map is not None
        known = self.map.get(oid)
        if known is not None and dst.has_chunk(known):
            return known, 0
        plain = src.get_chunk(oid)  # decrypted and verified with the source key
        new = dst.codec.object_id(plain)
        self.map.put(oid, new)
        if dst.has_chunk(new):
            return new, 0
        blob = dst.codec.pack(TYPE_CHUNK, new, plain)
        dst.put_raw_chunk(new, blob)  # verified with the destination key before it is stored
        return new, len(blob)

    def _dst_id(self, oid: bytes) -> bytes:
        return cast(bytes | None, self.done.get(oid)) or oid

    # -- one snapshot -----------------------------------------------------------------
    def _send_chunks(self, pool: ThreadPoolExecutor, entry: SnapshotCopy, snap: Snapshot) -> None:
        inflight: dict[bytes, int] = {}  # submitted, not yet handled: a few per worker

        def todo() -> Iterator[bytes]:
            for oid, n in _chunk_lengths(snap):
                if oid not in inflight and oid not in self.done:
                    inflight[oid] = n
                    yield oid

        def handle(oid: bytes, res: tuple[bytes, int]) -> None:
            self.done.add(oid, None if res[0] == oid else res[0])
            length = inflight.pop(oid)
            if res[1]:
                entry.chunks_sent += 1
                entry.bytes_sent += res[1]
                self.result.chunks_sent += 1
                self.result.bytes_sent += res[1]
            else:
                self.result.chunks_present += 1
            self.progress.advance(length)

        workers = max(1, self.opts.workers)
        _bounded(pool, self._chunk, todo(), workers * 2, handle)

    def _write_manifest(self, snap: Snapshot, present: dict[str, str]) -> str:
        """The commit point: the destination re-checks the chunks if it was pruned
        meanwhile (it trusts no cached "present")."""
        src, dst = self.src, self.dst
        used = _Mapped(snap, self.done)
        if self.raw:
            return dst.commit_raw_snapshot(snap.id, src.get_raw_snapshot(snap.id), snap.name,
                                           used)
        disks = []
        for d in snap.disks:
            buf = bytearray()
            for oid in d.chunks:
                buf += HOLE if oid == HOLE else self._dst_id(oid)
            disks.append(DiskRecord(d.name, d.size, ChunkList(buf), d.format, dict(d.meta)))
        meta = {**snap.meta, "copied_from": {"repository": src.id, "snapshot": snap.id}}
        new = Snapshot(name=snap.name, time=snap.time, chunk_size=snap.chunk_size, disks=disks,
                       tags=list(snap.tags), host=snap.host,
                       parent=present.get(snap.parent) if snap.parent else None,
                       meta=meta, stats=dict(snap.stats))
        return dst.commit_snapshot(new, used, hint="run it again")

    def _attachments(self, sid: str, dst_sid: str) -> int:
        src, dst = self.src, self.dst
        n = 0
        if self.raw:
            have = set(dst.attachment_ids(sid))
            for aid in src.attachment_ids(sid):
                if aid not in have:
                    dst.put_raw_attachment(sid, aid, src.get_raw_attachment(sid, aid))
                    n += 1
            return n

        def canon(doc: dict[str, Any]) -> str:
            return json.dumps({k: v for k, v in doc.items() if k != "snapshot"}, sort_keys=True)

        have_docs = {canon(d) for d in dst.attachments(dst_sid)}
        for doc in src.attachments(sid):
            if canon(doc) not in have_docs:
                dst.add_attachment(dst_sid, {k: v for k, v in doc.items() if k != "snapshot"})
                n += 1
        return n

    # -- the whole job ----------------------------------------------------------------
    def run(self) -> CopyResult:
        t0 = time.monotonic()
        src, dst = self.src, self.dst
        if src.id == dst.id:
            raise UsageError("source and destination are the same repository")
        if src.chunk_size != dst.chunk_size:
            raise UsageError(
                f"chunk sizes differ (source {src.chunk_size >> 10} KiB, destination "
                f"{dst.chunk_size >> 10} KiB); create the destination with "
                f"'vmdr repo init --from-repo' or the same --chunk-size")
        snaps = select(src, self.opts.names, self.opts.latest)
        present = _present_index(src, dst)
        todo = [s for s in snaps if s.id not in present]
        if todo:
            dst.refresh_chunk_index()
        self.done = IdTable("vmdr-copy-done-")
        try:
            with IdTable("vmdr-copy-total-") as lengths:  # the progress total: unique bytes
                for s in todo:
                    for oid, n in _chunk_lengths(src.load_snapshot(s.id)):
                        lengths.add(oid, n)
                self.progress.set_total(lengths.total())
            with ThreadPoolExecutor(max(1, self.opts.workers), "vmdr-copy") as pool:
                for s in snaps:
                    self._one(pool, s, present)
        finally:
            self.done.close()
            if self.map is not None:
                self.map.close()
        self.progress.finish()
        self.result.duration_s = time.monotonic() - t0
        return self.result

    def _one(self, pool: ThreadPoolExecutor, s: Snapshot, present: dict[str, str]) -> None:
        entry = SnapshotCopy(s.name, format_time(s.time), s.id, present.get(s.id, ""),
                             "present" if s.id in present else "copied")
        if entry.status == "copied":
            log.info("copying %s@%s", s.name, s.short_id)
            self.events.phase("copy", "", f"{s.name}@{s.short_id}")
            full = self.src.load_snapshot(s.id)  # its chunk list: one snapshot at a time
            self._send_chunks(pool, entry, full)
            entry.id = self._write_manifest(full, present)  # the commit point, last
            present[s.id] = entry.id
        self.result.attachments_copied += self._attachments(s.id, entry.id)
        self.result.snapshots.append(entry)


def copy_snapshots(src: Repository, dst: Repository, opts: CopyOptions | None = None,
                   events: JobEvents | None = None) -> CopyResult:
    """Copy the selected snapshots of *src* (with chunks and attachments) into *dst*.

    The caller holds a shared lock on both repositories.
    """
    return _Copier(src, dst, opts or CopyOptions(), events or JobEvents()).run()
