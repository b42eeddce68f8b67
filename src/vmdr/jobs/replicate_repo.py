"""``vmdr replicate --feed repository``: the newest snapshot of a VM in a repository at the
DR site into its standby, moving only the chunks whose ID differs from the standby's
current content (see :mod:`.replicate` for the cycle and the restore points)."""

from __future__ import annotations

import base64
import time

from vmdr.errors import SnapshotNotFound, UsageError, VmdrError
from vmdr.hypervisor import Hypervisor
from vmdr.jobs import replica_guard
from vmdr.jobs.replica_throttle import throttled
from vmdr.jobs.replicate import (
    CycleResult,
    ReplicaSpec,
    _check_standby,
    _disk_path,
    _finish,
    _Locks,
    _new_state,
    _prepare_disks,
    _record,
    _serve,
    _standby_xml,
    begin,
    check_networks,
    chunks_path,
    need_space,
    redact_uri,
)
from vmdr.jobs.replicate_site import DiskWriter, Site
from vmdr.jobs.replicate_state import changed_chunks
from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import DiskRecord, Snapshot
from vmdr.repository.reader import DiskReader
from vmdr.repository.repo import Repository
from vmdr.timeutil import utcnow


def newest_snapshot(repo: Repository, vm: str, ref: str | None = None) -> Snapshot:
    if ref:
        snap = repo.resolve(ref)
        if snap.name != vm:
            raise UsageError(f"snapshot {snap.short_id} is of {snap.name}, not {vm}")
        return snap
    snaps = [s for s in repo.list_snapshots(vm) if s.meta.get("kind") == "vm"]
    if not snaps:
        raise SnapshotNotFound(f"no snapshot of {vm} in the repository")
    return snaps[-1]


def replicate_from_repository(repo: Repository, target: Hypervisor, site: Site,
                              spec: ReplicaSpec, ref: str | None = None) -> CycleResult:
    """One repository-feed cycle: the newest snapshot of the VM into the standby, moving
    only the chunks that differ from the standby's current content."""
    res = CycleResult(spec.vm, spec.standby, redact_uri(spec.target_uri), "repository")
    t0 = lap = time.monotonic()
    snap = newest_snapshot(repo, spec.vm, ref)
    lap = res.lap("snapshot", lap)
    cfg = snap.meta.get("config") or {}
    src_xml = str(cfg.get("domain_xml") or "")
    if not src_xml:
        raise UsageError(f"snapshot {snap.short_id} holds no domain XML")
    with _Locks(spec, None):
        names = [chunks_path(spec, d.name).rsplit("/", 1)[1] for d in snap.disks]
        free, st, lists = begin(site, spec.directory, names)
        saved = {d.name: lists[i] for i, d in enumerate(snap.disks)}
        lap = res.lap("begin", lap)
        uuid = str(cfg.get("uuid") or "")
        if st is not None and uuid and st.source_uuid != uuid:
            raise UsageError(f"{spec.directory} on {site.where} holds a replica of another VM "
                             f"({st.vm}); use another --dir")
        res.warnings += replica_guard.check(site, target, spec.directory, spec.vm)
        defined = _check_standby(target, spec, st)
        networks = check_networks(target, src_xml, spec.network_map)
        lap = res.lap("checks", lap)
        if st is not None and st.snapshot == snap.id and not st.writing and defined:
            res.points = [p.name for p in st.points]
            res.point = st.newest.name if st.newest else None
            res.warnings.append(f"the standby already holds snapshot {snap.short_id}: "
                                "nothing to do (a replica from a repository is only as fresh "
                                "as the last copy)")
            _record(site, st, res, utcnow(), t0, None)
            return res
        st = st or _new_state(spec, str(snap.meta.get("uri") or "repository"), uuid)
        started = utcnow()
        disks = [d for d in snap.disks]
        paths = {d.name: _disk_path(spec, d.name) for d in disks}
        known_ok = (st.feed == "repository" and st.repository == repo.id and not st.writing)
        _standby_xml(src_xml, spec, st, paths, networks, None)  # fails before writing
        fresh = _prepare_disks(st, paths, {d.name: d.size for d in disks})
        res.disk_bytes = sum(d.size for d in disks)
        res.mode = "seed" if not st.points else "incremental"
        try:
            olds = {d.name: _old_ids(site, repo, d, paths[d.name], d.name in fresh,
                                     saved[d.name] if known_ok else None) for d in disks}
            todo = {d.name: changed_chunks(olds[d.name], list(d.chunks)) for d in disks}
            need = sum(repo.chunk_size for d in disks for i in todo[d.name]
                       if d.chunks[i] != HOLE)
            need_space(site, spec.directory, need, free)
            lap = res.lap("plan", lap)
            exports = _serve(site, st, [(d.name, paths[d.name], fresh.get(d.name),
                                         bool(todo[d.name])) for d in disks])
            lap = res.lap("serve", lap)
            if exports is not None:
                try:
                    for d in disks:
                        if todo[d.name]:
                            w = throttled(exports.writers[paths[d.name]], spec.bandwidth)
                            _apply_chunks(w, repo, d, todo[d.name], res)
                except BaseException:
                    exports.close(flush=False)
                    raise
                exports.close()
                res.bytes_sent = exports.stream.sent if exports.stream else 0
                lap = res.lap("copy", lap)
            nvram = base64.b64decode(cfg["nvram"]) if cfg.get("nvram") else None
            _finish(site, target, spec, st, res, snap.time, paths, defined, src_xml,
                    networks, nvram, t0,
                    {"snapshot": snap.id, "repository": repo.id, "checkpoint": None},
                    [(chunks_path(spec, d.name), d.chunks.tobytes()) for d in disks],
                    snapshot=snap.id)
        except VmdrError as exc:
            _record(site, st, res, started, t0, exc.message)
            raise
        res.lap("commit", lap)
    return res


def _old_ids(site: Site, repo: Repository, d: DiskRecord, path: str, fresh: bool,
             saved: bytes | None) -> list[bytes] | None:
    """The chunk IDs of the standby disk's current content: all holes for a new disk, the
    list saved by the last repository cycle (``saved``, read with the state), else
    computed by reading the standby."""
    n = len(d.chunks)
    if fresh:
        return [HOLE] * n
    if saved is not None and len(saved) == n * len(HOLE):
        return [saved[i * 32:(i + 1) * 32] for i in range(n)]
    w = site.writer(path)  # hash the standby where it is (the repository feed runs at the
    try:                   # DR site, so this read stays local there)
        zero = bytes(repo.chunk_size)
        out = []
        for i in range(n):
            ln = min(repo.chunk_size, d.size - i * repo.chunk_size)
            data = w.read(i * repo.chunk_size, ln)
            out.append(HOLE if data == zero[:ln] else repo.codec.object_id(data))
        return out
    finally:
        w.close(flush=False)


def _apply_chunks(w: DiskWriter, repo: Repository, d: DiskRecord, todo: list[int],
                  res: CycleResult) -> None:
    reader = DiskReader(repo, d)
    for i, data in reader.iter_chunks(iter(todo)):
        off = i * repo.chunk_size
        if data is None:
            ln = reader.chunk_length(i)
            w.zero(off, ln)
            res.bytes_zeroed += ln
        else:
            w.write(off, data)
            res.bytes_moved += len(data)
