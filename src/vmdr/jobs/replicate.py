"""``vmdr replicate``: keep a standby copy of a VM at another site, N restore points deep.

One **cycle**, under the VM's lock (and the replica's own, so two cycles of one replica
never overlap):

1. check the input before touching anything: the VM exists (exit 11), the DR host
   answers (12), every network the VM uses maps to a network that exists there (10), the
   standby is not running;
2. read what changed:

   * **direct feed**: an incremental of the running VM through the same pull-mode backup
     job and dirty bitmaps as ``vmdr backup``, from the replica's *own* checkpoint chain
     (prefix ``vmdr-replica-<12 hex>``, see :func:`.replicate_state.replica_prefix`); the
     first cycle (or a lost checkpoint) reads everything;
   * **repository feed**: the newest snapshot of the VM in a repository at the DR site;
     only chunks whose ID differs from the standby's current content move;

3. check the space at the target (exit 9), write the changed ranges into the standby's
   qcow2 disks through a writable NBD export at the target (over ssh for a remote
   target, key-authenticated: as zstd-or-raw frames to a helper there that writes them,
   :mod:`.replica_frames`), zeroes as NBD zero requests;
4. take a restore point (a qcow2 internal snapshot ``rp-<time>`` on every disk), drop
   the points beyond N, define the standby domain if it is not (new UUID, network
   mapping applied, never started), write the state file at the target;
5. only then commit the source checkpoint (direct feed): an interrupted cycle leaves the
   previous checkpoint in place and the next cycle re-reads everything since it.
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import (
    DomainNotFound,
    NetworkNotFound,
    NoSpace,
    UsageError,
    VmdrError,
    VMLocked,
)
from vmdr.hypervisor import (
    DiskSource,
    Hypervisor,
    interface_networks,
    map_networks,
    rewrite_domain_xml,
    set_uuid,
)
from vmdr.hypervisor.console import relocate_console_logs
from vmdr.jobs import replica_guard
from vmdr.jobs.replica_throttle import throttled
from vmdr.jobs.replicate_site import DiskWriter, Exports, Site, check_dir
from vmdr.jobs.replicate_state import (
    CHUNK,
    STATE_FILE,
    Cycle,
    ReplicaState,
    RestorePoint,
    pieces,
    point_name,
    replica_prefix,
    to_rotate,
    unique_point,
)
from vmdr.jobs.vmlock import VMLock
from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import chunk_count
from vmdr.repository.repo import Repository
from vmdr.storage.registry import redact
from vmdr.storage.throttle import TokenBucket
from vmdr.timeutil import utcnow

FEEDS = ("direct", "repository")


@dataclass
class ReplicaSpec:
    """One replica: which VM, where, how deep."""

    vm: str
    target_uri: str
    directory: str  # the standby's directory at the target
    standby: str = ""  # the standby domain's name (default ``<vm>-replica``)
    keep: int = 3  # restore points kept
    feed: str = "direct"
    rpo_target_s: float | None = None
    network_map: dict[str, str] = field(default_factory=dict)
    consistency: str = "auto"  # auto (quiesce if the agent answers) | crash
    scratch_dir: str = "/var/lib/libvirt/qemu/vmdr"
    compress: bool = True  # ssh compression of the data (over ssh only)
    bandwidth: TokenBucket | None = None  # --bwlimit: the changed pieces' rate

    def __post_init__(self) -> None:
        self.directory = check_dir(self.directory)
        self.standby = self.standby or f"{self.vm}-replica"
        if self.keep < 1:
            raise UsageError("--points must be at least 1")
        if self.feed not in FEEDS:
            raise UsageError(f"unknown replica feed {self.feed!r} (direct or repository)")


@dataclass
class CycleResult:
    vm: str
    standby: str
    target: str
    feed: str
    mode: str = "none"  # seed | incremental | full | none
    point: str | None = None
    point_time: str | None = None
    bytes_moved: int = 0  # data written into the standby (before compression)
    bytes_sent: int = 0  # the framed stream's bytes over ssh (after zstd); 0 when local
    bytes_zeroed: int = 0  # ranges cleared with NBD zero requests (no data moved)
    disk_bytes: int = 0  # the standby disks' virtual size
    points: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    defined: bool = False  # the standby domain was (re)defined in this cycle
    duration_s: float = 0.0
    consistency: str | None = None
    warnings: list[str] = field(default_factory=list)
    # seconds per step (begin, backup, serve, copy, commit...): where a cycle's time goes
    timings: dict[str, float] = field(default_factory=dict)

    def lap(self, step: str, since: float) -> float:
        """Add the time since ``since`` to ``step``; the time now (for the next lap)."""
        now = time.monotonic()
        self.timings[step] = self.timings.get(step, 0.0) + now - since
        return now

    def as_dict(self) -> dict[str, Any]:
        out = {k: (round(v, 3) if isinstance(v, float) else v)
               for k, v in self.__dict__.items()}
        out["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return out


def redact_uri(uri: str) -> str:
    """A URI for messages and the state: no password, no query (key file paths)."""
    return redact(uri.split("?", 1)[0])


def _disk_path(spec: ReplicaSpec, target: str) -> str:
    return f"{spec.directory}/{spec.standby}-{target}.qcow2"


def chunks_path(spec: ReplicaSpec, disk: str) -> str:
    """The chunk IDs (repository feed) of a standby disk's content, 32 bytes each."""
    return f"{spec.directory}/{spec.standby}-{disk}.chunks"


def load_state(site: Site, directory: str) -> ReplicaState | None:
    path = f"{directory}/{STATE_FILE}"
    data = site.read(path)
    return None if data is None else ReplicaState.from_json(data, f"{site.where}:{path}")


def _save(site: Site, st: ReplicaState) -> None:
    site.write(f"{st.directory}/{STATE_FILE}", st.to_json())


class _Locks:
    """The source VM's lock (direct feed: the same one ``vmdr backup`` takes) and the
    replica's own lock; VMLocked (exit 13) names what holds it."""

    def __init__(self, spec: ReplicaSpec, source_uri: str | None) -> None:
        self.locks = [VMLock(f"replica:{redact_uri(spec.target_uri)}:{spec.directory}", spec.vm)]
        if source_uri is not None:
            self.locks.insert(0, VMLock(source_uri, spec.vm))

    def __enter__(self) -> _Locks:
        taken: list[VMLock] = []
        try:
            for lk in self.locks:
                lk.acquire()
                taken.append(lk)
        except VMLocked as exc:
            for lk in taken:
                lk.release()
            raise VMLocked(f"{exc.message.split(':', 1)[0]}: another vmdr job (a backup or a "
                           "replica cycle) is running for it; try again when it is done") \
                from None
        return self

    def __exit__(self, *exc: object) -> None:
        for lk in reversed(self.locks):
            lk.release()


# -- checks before anything is touched -----------------------------------------------------


def check_networks(target: Hypervisor, xml: str, mapping: dict[str, str]) -> dict[str, str]:
    """The mapping for the VM's networks (identity where none is given); NetworkNotFound
    (exit 10) if a DR network does not exist at the target."""
    used = {}
    for net in interface_networks(xml):
        dst = mapping.get(net, net)
        try:
            target.network(dst)
        except NetworkNotFound:
            how = f"mapped from source network {net!r}" if net in mapping else \
                f"source network {net!r} has no mapping (--network-map {net}=DR-NETWORK)"
            raise NetworkNotFound(f"network {dst!r} does not exist on the DR host "
                                  f"{redact_uri(target.uri)} ({how})") from None
        used[net] = dst
    return used


def _check_standby(target: Hypervisor, spec: ReplicaSpec, st: ReplicaState | None) -> bool:
    """True if the standby domain is defined at the target. Refuses a running standby
    (failed over, or someone started it) and a domain of that name that is not ours."""
    try:
        dom = target.lookup(spec.standby)
    except DomainNotFound:
        return False
    if st is None or dom.uuid != st.standby_uuid:
        raise UsageError(f"a domain named {spec.standby!r} exists on {redact_uri(target.uri)} and "
                         "is not this replica's standby; choose another --standby-name")
    if dom.is_active():
        raise UsageError(f"the standby {spec.standby!r} is running on {redact_uri(target.uri)} "
                         "(failed over?): a replica cycle never writes under a running VM")
    return True


def _new_state(spec: ReplicaSpec, source_uri: str, source_uuid: str) -> ReplicaState:
    import uuid as uuidlib

    return ReplicaState(
        vm=spec.vm, source_uri=redact_uri(source_uri), source_uuid=source_uuid,
        standby=spec.standby, standby_uuid=str(uuidlib.uuid4()),
        target_uri=redact_uri(spec.target_uri), directory=spec.directory,
        prefix=replica_prefix(spec.target_uri, spec.directory), feed=spec.feed,
        keep=spec.keep, rpo_target_s=spec.rpo_target_s)


def _standby_xml(src_xml: str, spec: ReplicaSpec, st: ReplicaState, paths: dict[str, str],
                 networks: dict[str, str], nvram: str | None) -> str:
    try:
        xml = rewrite_domain_xml(src_xml, new_name=spec.standby, new_uuid=True,
                                 new_macs=False, nvram_path=nvram,
                                 disk_paths={t: (p, "qcow2") for t, p in paths.items()})
    except ValueError as exc:
        raise UsageError(f"{spec.vm}: cannot define a standby from its definition ({exc})") \
            from None
    xml = set_uuid(map_networks(xml, networks), st.standby_uuid)
    return relocate_console_logs(xml, spec.directory, spec.standby)


def _define(target: Hypervisor, xml: str) -> None:
    target.define(xml)


# -- the common end of a cycle ---------------------------------------------------------------


def _finish(site: Site, target: Hypervisor, spec: ReplicaSpec, st: ReplicaState,
            res: CycleResult, when: datetime, paths: dict[str, str], defined: bool,
            src_xml: str, networks: dict[str, str], nvram: bytes | None, t0: float,
            updates: dict[str, Any], files: list[tuple[str, bytes]] | None = None,
            **point: Any) -> None:
    """Define the standby if it is not, then take the restore point, drop the points
    beyond N and save the state in ONE command at the target (:meth:`Site.commit`): the
    point on every disk first, then ``files`` (the repository feed's chunk lists), the
    UEFI variables and the state, last. ``updates`` (the source position: checkpoint or
    snapshot) go into the saved state with the point. ``st`` is left as it was when
    this fails (the caller records the error)."""
    files = list(files or [])
    nvram_path = None
    if nvram is not None:  # UEFI variables: copied every cycle (a few hundred KiB)
        nvram_path = f"{spec.directory}/{spec.standby}_VARS.fd"
        if defined:
            files.append((nvram_path, nvram))
        else:  # the first definition names the file: it must exist first
            site.write(nvram_path, nvram)
    tag = unique_point(point_name(when), [p.name for p in st.points])
    new = RestorePoint(name=tag, time=when.isoformat(), feed=spec.feed, mode=res.mode,
                       bytes_moved=res.bytes_moved, **point)
    pinned = site.pinned_points(spec.directory)  # read by a running test failover
    old = [o for o in to_rotate([*st.points, new], spec.keep) if o.name not in pinned]
    if not defined:
        _define(target, _standby_xml(src_xml, spec, st, paths, networks, nvram_path))
        res.defined = True
    done = copy.deepcopy(st)
    done.points = [q for q in [*st.points, new] if q not in old]
    done.keep, done.rpo_target_s, done.feed, done.network_map = (spec.keep, spec.rpo_target_s,
                                                                 spec.feed, networks)
    done.writing = False
    for k, v in updates.items():  # the source position of the new point
        setattr(done, k, v)
    res.rotated = [o.name for o in old]
    res.point, res.point_time = tag, new.time
    res.points = [q.name for q in done.points]
    res.duration_s = time.monotonic() - t0
    done.add_cycle(_cycle(res, when, None))
    site.commit([*files, (f"{st.directory}/{STATE_FILE}", done.to_json())], tag,
                list(paths.values()), [o.name for o in old])
    st.__dict__.update(done.__dict__)


def _cycle(res: CycleResult, started: datetime, error: str | None) -> Cycle:
    return Cycle(started=started.isoformat(), duration_s=round(res.duration_s, 3),
                 feed=res.feed, mode=res.mode, bytes_moved=res.bytes_moved,
                 bytes_zeroed=res.bytes_zeroed, point=res.point, error=error)


def _record(site: Site, st: ReplicaState, res: CycleResult, started: datetime, t0: float,
            error: str | None) -> None:
    res.duration_s = time.monotonic() - t0
    st.add_cycle(_cycle(res, started, error))
    _save(site, st)


# -- direct feed -------------------------------------------------------------------------------


def _incremental_from(hv: Hypervisor, info: Any, st: ReplicaState | None,
                      warnings: list[str]) -> str | None:
    if st is None or st.feed != "direct" or st.checkpoint is None:
        return None
    if st.writing:
        warnings.append("the last cycle was interrupted while writing: re-reading everything")
        return None
    if st.checkpoint in hv.list_checkpoints(info, st.prefix):
        return st.checkpoint  # a stopped VM too: its qcow2 bitmaps hold the changes
    if not info.running:
        warnings.append(f"checkpoint {st.checkpoint} is gone: reading the stopped VM in full")
        return None
    if st.checkpoint_xml:
        try:
            hv.redefine_checkpoint(info, st.checkpoint_xml)
            warnings.append(f"libvirt had lost checkpoint {st.checkpoint}; redefined it")
            return st.checkpoint
        except VmdrError as exc:
            warnings.append(f"checkpoint {st.checkpoint} cannot be redefined ({exc.message})")
    warnings.append(f"checkpoint {st.checkpoint} is gone: reading everything")
    return None


def replicate_direct(hv: Hypervisor, target: Hypervisor, site: Site, spec: ReplicaSpec,
                     seed_repo: Callable[[], Repository] | None = None) -> CycleResult:
    """One direct-feed cycle (see the module docstring). Raises VmdrError on failure.

    A standby seeded from a repository (the repository feed) switches to the direct feed
    without sending everything again when ``seed_repo`` opens a repository with the same
    chunk-ID key (the seed's, or a ``vmdr copy`` of it that shares its key): the first
    direct cycle reads the whole VM here, hashes each 4 MiB chunk and sends only the
    chunks whose ID differs from the list saved with the standby."""
    res = CycleResult(spec.vm, spec.standby, redact_uri(spec.target_uri), "direct")
    t0 = lap = time.monotonic()
    with _Locks(spec, hv.uri):
        info = hv.domain(spec.vm)  # DomainNotFound: exit 11
        lap = res.lap("source", lap)
        free, st, _ = begin(site, spec.directory)
        lap = res.lap("begin", lap)
        if st is not None and st.source_uuid != info.uuid:
            raise UsageError(f"{spec.directory} on {site.where} holds a replica of another VM "
                             f"({st.vm}, {st.source_uuid}); use another --dir")
        res.warnings += replica_guard.check(site, target, spec.directory, spec.vm)
        defined = _check_standby(target, spec, st)
        src_xml = hv.lookup(spec.vm).xml(inactive=True)
        networks = check_networks(target, src_xml, spec.network_map)
        lap = res.lap("checks", lap)
        prefix = replica_prefix(spec.target_uri, spec.directory)
        scratch = os.path.join(spec.scratch_dir, "replica-" + prefix[-12:])
        for what in hv.cleanup_leftovers(spec.vm, prefix, scratch):
            res.warnings.append(f"cleaned up after an interrupted cycle: {what}")
        wanted = [d.target for d in info.disks if d.device in ("disk", "lun") and d.imageable]
        if not wanted:
            raise UsageError(f"{spec.vm}: has no disks that can be replicated")
        st = st or _new_state(spec, hv.uri, info.uuid)
        inc_from = _incremental_from(hv, info, st, res.warnings)
        quiesce = spec.consistency != "crash" and info.running
        started = utcnow()
        session = hv.backup(info, checkpoint_prefix=prefix, scratch_dir=scratch,
                            disks=wanted, incremental_from=inc_from, quiesce=quiesce)
        with session as s:
            lap = res.lap("backup_start", lap)
            res.consistency = s.consistency
            res.warnings.extend(s.warnings)
            sources = [d for d in s.disks if d.info.target in wanted]
            plan = {d.info.target: list(d.extents()) for d in sources}
            need = sum(e.length for exts in plan.values() for e in exts if e.is_data)
            need_space(site, spec.directory, need, free)  # NoSpace: exit 9, nothing written
            paths = {d.info.target: _disk_path(spec, d.info.target) for d in sources}
            _standby_xml(src_xml, spec, st, paths, networks, None)  # fails before writing
            fresh = _prepare_disks(st, paths, {d.info.target: d.size for d in sources})
            res.disk_bytes = sum(d.size for d in sources)
            res.mode = ("seed" if not st.points else
                        "incremental" if all(d.incremental for d in sources) else "full")
            known = _seeded_ids(site, spec, st, sources, set(fresh), seed_repo, res.warnings)
            # only the disks with something to write are served (an idle disk costs nothing)
            busy = {d.info.target for d in sources if d.info.target in known
                    or any(e.is_data or not d.incremental for e in plan[d.info.target])}
            lap = res.lap("plan", lap)
            try:
                exports = _serve(site, st, [(t, paths[t], fresh.get(t), t in busy)
                                            for t in paths])
                lap = res.lap("serve", lap)
                if exports is not None:
                    try:
                        for d in sources:
                            t = d.info.target
                            if t not in busy:
                                continue
                            w = throttled(exports.writers[paths[t]], spec.bandwidth)
                            if t in known:
                                _copy_by_chunks(w, d, plan[t], known[t], res)
                            else:
                                _copy_disk(w, d, plan[t], t in fresh, res)
                    except BaseException:
                        exports.close(flush=False)
                        raise
                    exports.close()
                    res.bytes_sent = exports.stream.sent if exports.stream else 0
                    lap = res.lap("copy", lap)
                _finish(site, target, spec, st, res, started, paths, defined, src_xml,
                        networks, _nvram(hv, info, res.warnings), t0,
                        _position(s, inc_from, st),
                        checkpoint=s.checkpoint)
            except VmdrError as exc:
                _record(site, st, res, started, t0, exc.message)
                raise
            lap = res.lap("commit", lap)
            s.commit()
        res.lap("backup_end", lap)
    return res


def _position(s: Any, inc_from: str | None, st: ReplicaState) -> dict[str, Any]:
    """The source checkpoint the new point matches. A stopped VM's read makes none (libvirt
    cannot add a checkpoint offline): the one it read from stays, its bitmaps keep
    tracking every change since, so the next cycle re-reads from there."""
    if s.checkpoint is None and inc_from is not None and s.method == "offline":
        return {"checkpoint": inc_from, "checkpoint_xml": st.checkpoint_xml}
    return {"checkpoint": s.checkpoint, "checkpoint_xml": s.checkpoint_xml}


def _nvram(hv: Hypervisor, info: Any, warnings: list[str]) -> bytes | None:
    try:
        return hv.read_nvram(info)
    except VmdrError as exc:
        warnings.append(f"could not read the UEFI variables: {exc.message}")
        return None


def _prepare_disks(st: ReplicaState, paths: dict[str, str],
                   sizes: dict[str, int]) -> dict[str, int]:
    """The standby disks to create (target -> size): those the state does not know yet.
    They are created by :func:`_serve`, with the state file that names them."""
    fresh = {}
    for t, path in paths.items():
        known = st.disks.get(t)
        if known is not None and int(known.get("size", -1)) != sizes[t]:
            raise UsageError(f"disk {t} changed size since the replica was seeded; remove "
                             f"{st.directory} and the standby, then seed again")
        if known is None or known.get("path") != path:
            fresh[t] = sizes[t]
        st.disks[t] = {"path": path, "size": sizes[t]}
    return fresh


def _serve(site: Site, st: ReplicaState,
           disks: list[tuple[str, str, int | None, bool]]) -> Exports | None:
    """Mark the state ``writing``, create the new disks and serve the busy ones, in one
    command at the target: (target, path, size to create or None, busy) per disk. None
    when nothing is created or written (an idle cycle): the state stays as it is."""
    if not any(size is not None or busy for _t, _p, size, busy in disks):
        return None
    st.writing = True
    return site.serve((f"{st.directory}/{STATE_FILE}", st.to_json()),
                      [(p, size, busy) for _t, p, size, busy in disks])


def begin(site: Site, directory: str, extra: list[str] | None = None) -> \
        tuple[int, ReplicaState | None, list[bytes | None]]:
    """The first command of a cycle at the target: the directory made, its free bytes,
    the replica's state, and the files ``extra`` of the directory (None if missing)."""
    free, files = site.begin(directory, [STATE_FILE, *(extra or [])])
    where = f"{site.where}:{directory}/{STATE_FILE}"
    data = files[0]
    return free, None if data is None else ReplicaState.from_json(data, where), files[1:]


def need_space(site: Site, directory: str, needed: int, free: int) -> None:
    """NoSpace (exit 9) unless ``needed`` bytes (plus 1 % and 64 MiB for qcow2 metadata)
    fit in ``free`` (the directory's free bytes at the cycle's start)."""
    want = needed + needed // 100 + (64 << 20)
    if free < want:
        raise NoSpace(f"not enough space for the replica in {directory} on {site.where}: "
                      f"{free >> 20} MiB free, this cycle needs {want >> 20} MiB")


@dataclass
class _Known:
    ids: list[bytes]
    repo: Repository


def _seeded_ids(site: Site, spec: ReplicaSpec, st: ReplicaState, sources: list[DiskSource],
                fresh: set[str], seed_repo: Callable[[], Repository] | None,
                warnings: list[str]) -> dict[str, _Known]:
    """Per disk read in full over a standby that the repository feed wrote last: the chunk
    IDs of the standby's content, when a repository to compute IDs with is at hand."""
    if st.feed != "repository" or st.writing or not st.repository:
        return {}
    todo = [d for d in sources if not d.incremental and d.info.target not in fresh]
    if not todo:
        return {}
    if seed_repo is None:
        warnings.append("the standby was written by the repository feed: give --repo (the "
                        "repository it came from, or a copy sharing its key) to send only "
                        "the chunks that differ; sending everything")
        return {}
    repo = seed_repo()
    out = {}
    for d in todo:
        saved = site.read(chunks_path(spec, d.info.target))
        n = chunk_count(d.size, repo.chunk_size)
        if saved is not None and len(saved) == n * len(HOLE):
            out[d.info.target] = _Known([saved[i * 32:(i + 1) * 32] for i in range(n)], repo)
    return out


def _copy_by_chunks(w: DiskWriter, d: DiskSource, extents: Sequence[Any], known: _Known,
                    res: CycleResult) -> None:
    cs = known.repo.chunk_size
    with_data: set[int] = set()
    for e in extents:
        if e.is_data:
            with_data.update(range(e.offset // cs, (e.offset + e.length - 1) // cs + 1))
    zero = bytes(cs)
    for i, old in enumerate(known.ids):
        off = i * cs
        ln = min(cs, d.size - off)
        data = d.read(off, ln) if i in with_data else None
        oid = HOLE if data is None or data == zero[:ln] else known.repo.codec.object_id(data)
        if oid == old:
            continue  # the standby already holds this chunk
        if data is None or oid == HOLE:
            w.zero(off, ln)
            res.bytes_zeroed += ln
        else:
            w.write(off, data)
            res.bytes_moved += ln


READ_AHEAD = 3  # pieces (of up to 4 MiB) read from the source while the last one is sent


def read_ahead(read: Callable[[int, int], bytes], spans: Sequence[tuple[int, int, bool]],
               depth: int = READ_AHEAD) -> Iterator[tuple[int, int, bytes | None]]:
    """``(offset, length, data)`` for every span in order, ``data`` None for a span not
    to be read; a helper thread reads up to ``depth`` spans ahead, so reading the source
    overlaps sending to the target (compression and the network)."""
    with ThreadPoolExecutor(1, thread_name_prefix="vmdr-replica-read") as pool:
        todo = iter(spans)
        ahead: deque[tuple[int, int, Future[bytes] | None]] = deque()

        def more() -> None:
            for off, ln, wanted in todo:
                ahead.append((off, ln, pool.submit(read, off, ln) if wanted else None))
                if wanted:
                    return

        for _ in range(depth):
            more()
        while ahead:
            off, ln, fut = ahead.popleft()
            if fut is not None:
                more()
            yield off, ln, None if fut is None else fut.result()


def _copy_disk(w: DiskWriter, d: DiskSource, extents: Sequence[Any], fresh: bool,
               res: CycleResult) -> None:
    zero = bytes(CHUNK)
    spans: list[tuple[int, int, bool]] = []
    for e in extents:
        if e.is_data:
            spans.extend((off, ln, True) for off, ln in pieces([(e.offset, e.length)]))
        elif not d.incremental and not fresh:  # a full over old content: clear holes
            spans.append((e.offset, e.length, False))
    for off, ln, data in read_ahead(d.read, spans):
        if data is None or data == zero[:ln]:
            w.zero(off, ln)
            res.bytes_zeroed += ln
        else:
            w.write(off, data)
            res.bytes_moved += ln
