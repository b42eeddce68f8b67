"""Tape jobs over a repository: ``vmdr tape backup``, ``restore`` and ``catalog --rebuild``.

- **backup** writes the selected snapshots' stored chunks (already encrypted and
  authenticated: no plaintext reaches the tape) that the pool's current media set lacks,
  then their manifests, and ends each tape with its catalog. A ring buffer fed by parallel
  repository reads keeps the drive streaming.
- **restore** recreates a repository from a media set (config, key slots, chunks,
  manifests): with nothing but the tapes and the exported key file. Every object is
  authenticated by the repository codec before it is stored.
- **rebuild** recreates the on-disk tape catalog from the tapes alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from vmdr.errors import IntegrityError, SnapshotNotFound, UsageError
from vmdr.events import ItemProgress, JobEvents
from vmdr.repository.crypto import HOLE
from vmdr.repository.keys import parse_keyfile
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository
from vmdr.storage.base import Backend
from vmdr.tape.catalog import Catalog, CatalogBackend
from vmdr.tape.formats import T_CHUNK, T_SNAPSHOT, pool_key, tape_mac_key
from vmdr.tape.library import Library
from vmdr.tape.media import Media
from vmdr.tape.pool_reader import merge_scan, scan_tape
from vmdr.tape.pool_writer import PoolWriter, RepoInfo
from vmdr.tape.ringbuffer import RingBuffer
from vmdr.tape.streaming import WriteBehind
from vmdr.timeutil import Clock, format_time, utcnow

log = logging.getLogger(__name__)


def mac_key_of(repo: Repository) -> bytes | None:
    return tape_mac_key(repo.key.raw if repo.key else None)


def mac_key_from_keyfile(data: bytes | None) -> bytes | None:
    if data is None:
        return None
    return tape_mac_key(parse_keyfile(data)[1].raw)


def seal_key_of(key_file: str | None) -> bytes | None:
    if not key_file:
        return None
    from vmdr.credentials import read_secret_bytes

    return pool_key(read_secret_bytes(key_file))


@dataclass
class TapeBackupResult:
    media_set: str
    tapes: list[str]
    snapshots: list[str]
    chunks_written: int
    chunks_skipped: int
    bytes: int
    seconds: float
    ring_stalls: int
    tapes_full: list[str] = field(default_factory=list)
    drive_stalls: int = 0  # times the drive thread found no block to write mid-stream
    drive_idle_seconds: float = 0.0  # its total wait in those stalls
    drive_busy_seconds: float = 0.0  # time inside the drive's write calls

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "rate": self.bytes / self.seconds if self.seconds else 0.0}


def repo_info(repo: Repository) -> RepoInfo:
    config, keys = repo.raw_metadata()
    return RepoInfo(repo.id, config, keys)


def _objects(repo: Repository, snaps: list[Snapshot], workers: int = 4, ahead: int = 16
             ) -> Iterator[tuple[int, bytes, bytes]]:
    """Every distinct chunk of *snaps* (raw stored bytes), then the manifests, in order.

    *workers* threads read the chunk objects, at most *ahead* of them past the one being
    handed on (bounded: the ring buffer behind this sets the memory, not the repository's
    size). Each read is one object GET, so parallel reads hide the per-object latency of
    a file system, SFTP or S3."""
    seen: set[bytes] = set()
    order: list[bytes] = []
    for s in snaps:
        for d in s.disks:
            for oid in d.chunks:
                if oid != HOLE and oid not in seen:
                    seen.add(oid)
                    order.append(oid)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vmdr-tape-read")
    pending: deque[tuple[bytes, Future[bytes]]] = deque()
    try:
        todo = iter(order)
        for oid in islice(todo, ahead):
            pending.append((oid, pool.submit(repo.get_raw_chunk, oid)))
        while pending:
            oid, fut = pending.popleft()
            blob = fut.result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(repo.get_raw_chunk, nxt)))
            yield T_CHUNK, oid, blob
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
    for s in snaps:
        yield T_SNAPSHOT, bytes.fromhex(s.id), repo.get_raw_snapshot(s.id)


def select_snapshots(repo: Repository, names: list[str], all_vms: bool) -> list[Snapshot]:
    """The latest snapshot of each named VM (``NAME@ID`` for a given one), or of every
    name with ``--all``."""
    if all_vms:
        latest: dict[str, Snapshot] = {}
        for s in repo.list_snapshots():
            latest[s.name] = s
        return sorted(latest.values(), key=lambda s: s.name)
    if not names:
        raise UsageError("name the VMs to put on tape, or give --all")
    return [repo.resolve(n) for n in names]


def backup_to_tape(repo: Repository, lib: Library, store: CatalogBackend, pool_name: str,
                   snaps: list[Snapshot], events: JobEvents | None = None,
                   clock: Clock = utcnow, ring_bytes: int = 256 << 20,
                   archive_size: int = 1 << 30, readers: int = 4) -> TapeBackupResult:
    if not snaps:
        raise SnapshotNotFound("no snapshots to put on tape")
    t0 = time.monotonic()
    with store.locked() as cat:
        pool = cat.pool(pool_name)
        rot = store.rotation(pool.name) if pool.allocation == "rotation" else None
        ev = events or JobEvents()
        ev.phase("write", f"writing to pool {pool_name}", f"tape {pool_name}")
        progress: ItemProgress = ev.progress(f"tape {pool_name}")  # stored sizes: no total
        inner = lib.drive
        # real drives: a drive thread overlaps each SCSI round trip with the next frames'
        # MACs; the virtual drive (page-cache writes) is faster without it (measured:
        # the extra thread made the kernel time bimodal)
        wb = WriteBehind(inner) if inner.write_behind > 0 else None
        if wb is not None:
            lib.drive = wb
        done = False
        try:
            w = PoolWriter(lib, cat, pool, repo_info(repo), mac_key_of(repo), clock,
                           seal_key_of(pool.key_file), archive_size,
                           progress.advance, rot)
            ms = w.start()
            ring = RingBuffer(_objects(repo, snaps, readers), lambda t: len(t[2]), ring_bytes)
            written = skipped = 0
            by_id = {s.id: s for s in snaps}
            for ftype, oid, blob in ring:
                if ftype == T_CHUNK:
                    if w.add_chunk(oid, blob):
                        written += 1
                    else:
                        skipped += 1
                else:
                    s = by_id[oid.hex()]
                    w.add_snapshot(oid, blob, s.name, format_time(s.time),
                                   sum(d.size for d in s.disks))
            w.finish()
            done = True
        finally:
            lib.drive = inner
            if wb is not None and done:
                wb.stop()
            elif wb is not None:  # the error on its way out says what went wrong
                with contextlib.suppress(Exception):
                    wb.stop()
        if rot is not None:
            store.save_rotation(pool.name, rot)
        full = [m.label for m in cat.set_media(ms.uuid) if m.full]
    progress.finish()
    return TapeBackupResult(ms.uuid, w.tapes_used, [s.id for s in snaps], written, skipped,
                            w.bytes_written, time.monotonic() - t0, ring.stalls, full,
                            wb.stalls if wb else 0, wb.idle_seconds if wb else 0.0,
                            wb.busy_seconds if wb else 0.0)


# --------------------------------------------------------------------- restore
@dataclass
class TapeRestoreResult:
    media_set: str
    tapes: list[str]
    chunks: int
    snapshots: list[str]
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _set_to_restore(cat: Catalog, media_set: str | None, snapshot: str | None) -> str:
    if media_set:
        hits = [u for u in cat.sets if u.startswith(media_set)]
        if len(hits) != 1:
            raise UsageError(f"no single media set matches {media_set!r}")
        return hits[0]
    if snapshot:
        name, _, sel = snapshot.partition("@")
        ents = sorted((e for e in cat.snapshots.values()
                       if (e.name == name and (not sel or e.id.startswith(sel)))
                       or (len(name) >= 4 and e.id.startswith(name))),
                      key=lambda e: e.time)
        if not ents:
            raise SnapshotNotFound(f"no snapshot {snapshot!r} on tape (rebuild the catalog?)")
        return ents[-1].media_set
    raise UsageError("give --media-set or a snapshot to restore")


def restore_from_tape(lib: Library, store: CatalogBackend, target: Backend,
                      keyfile: bytes | None, media_set: str | None = None,
                      snapshot: str | None = None, pool_key_file: str | None = None,
                      events: JobEvents | None = None,
                      open_repo: Callable[[Backend], Repository] | None = None
                      ) -> TapeRestoreResult:
    """Bring a media set's objects into the repository at *target*; when *target* holds
    no repository, recreate it from the set label (same id, config and key slots)."""
    t0 = time.monotonic()
    mac_key = mac_key_from_keyfile(keyfile)
    seal = seal_key_of(pool_key_file)
    ev = events or JobEvents()
    progress = ev.progress("from tape")
    with store.locked() as cat:
        set_uuid = _set_to_restore(cat, media_set, snapshot)
        tapes = cat.set_media(set_uuid)
        if not tapes:
            raise UsageError(f"media set {set_uuid[:8]} has no tapes in the catalog")
        for m in tapes:
            if m.in_vault:
                raise UsageError(f"tape {m.label} of the set is in vault {m.in_vault}: "
                                 "recall it and 'vmdr tape import' it first")
        repo: Repository | None = None
        counts = {"chunks": 0, "bytes": 0}
        snaps: list[str] = []

        def sink(ftype: int, oid: bytes, blob: bytes) -> None:
            assert repo is not None
            if ftype == T_CHUNK:
                if not repo.has_chunk(oid):
                    repo.put_raw_chunk(oid, blob)  # authenticates first
                    counts["chunks"] += 1
            else:
                # authenticated before it is written; its chunks came first from the set
                repo.commit_raw_snapshot(oid.hex(), blob, f"snapshot {oid.hex()[:8]}", ())
                snaps.append(oid.hex())
            counts["bytes"] += len(blob)
            progress.advance(len(blob))

        for m in tapes:
            got = lib.load_label(m.label)
            if got.uuid != m.uuid:
                raise IntegrityError(f"tape {m.label} is not the tape the catalog knows")
            if repo is None:
                from vmdr.tape.pool_reader import read_set_label

                doc = read_set_label(lib, mac_key)
                repo = _open_target(target, doc["repository"], keyfile, open_repo)
            scan_tape(lib, mac_key, seal, sink)
        if repo is not None:
            repo.bump_generation()
            repo.close()
    progress.finish()
    return TapeRestoreResult(set_uuid, [m.label for m in tapes], counts["chunks"], snaps,
                             counts["bytes"], time.monotonic() - t0)


def _open_target(target: Backend, rdoc: dict[str, Any], keyfile: bytes | None,
                 open_repo: Callable[[Backend], Repository] | None) -> Repository:
    Repository.recreate(target, str(rdoc["config"]).encode(),
                        {str(k): str(v).encode() for k, v in rdoc.get("keys", {}).items()})
    if open_repo is not None:
        repo = open_repo(target)
    else:
        repo = Repository.open(target, keyfile=keyfile, use_cache=False)
    if repo.id != rdoc["id"]:
        raise UsageError(f"the target holds repository {repo.id[:8]}, the tapes come from "
                         f"{str(rdoc['id'])[:8]}")
    return repo


# --------------------------------------------------------------------- catalog rebuild
@dataclass
class RebuildResult:
    tapes: list[str]
    sets: int
    snapshots: int
    bytes_read: int
    seconds: float
    unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rebuild_catalog(lib: Library, store: CatalogBackend, keyfile: bytes | None,
                    full: bool = True, pool_key_file: str | None = None) -> RebuildResult:
    """Read every tape in the library and recreate the catalog from what they say.
    ``full`` reads and checks every frame; otherwise each tape's (MAC-checked) catalog."""
    from vmdr.errors import LabelUnreadable

    t0 = time.monotonic()
    mac_key = mac_key_from_keyfile(keyfile)
    seal = seal_key_of(pool_key_file)
    nbytes = {"n": 0}

    def count(ftype: int, oid: bytes, blob: bytes) -> None:
        nbytes["n"] += len(blob)

    seen: list[str] = []
    bad: list[str] = []
    with store.locked() as cat:
        if lib.changer is not None and lib.loaded_element() is not None:
            lib.unload()
        slots = [e for e in (lib.changer.status().slots if lib.changer else [])
                 if e.full and not e.cleaning]
        if lib.changer is None:
            scan = scan_tape(lib, mac_key, seal, count if full else None, full)
            seen.append(merge_scan(cat, scan).label)
        for el in slots:
            lib.load_slot(el.number)
            try:
                scan = scan_tape(lib, mac_key, seal, count if full else None, full)
            except LabelUnreadable:
                bad.append(el.barcode or f"slot {el.number}")
                lib.unload()
                continue
            m: Media = merge_scan(cat, scan)
            seen.append(m.label)
            lib.unload()
    return RebuildResult(seen, len(cat.sets), len(cat.snapshots), nbytes["n"],
                         time.monotonic() - t0, bad)

