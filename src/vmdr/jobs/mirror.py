"""``vmdr replicate VM --to HOST --continuous [--sync]``: a live mirror of a running VM's
disks at the DR site, supervised, with a fall-back to snapshot cycles.

The supervisor runs in the foreground (the agent runs it as a long job and starts it
again when it ends) and loops:

1. **a snapshot cycle** (:func:`vmdr.jobs.replicate.replicate_direct`): seeds the standby
   on the first run, defines the standby domain, brings the standby up to date and leaves
   a restore point — the base the mirror builds on, and the fall-back when it cannot run;
2. **the mirror**: the standby disks are served by ``qemu-storage-daemon`` at the DR host,
   reached through an ssh tunnel (:mod:`vmdr.jobs.mirror_site`), and every disk gets a
   libvirt block copy to it (full copy, then every guest write), never pivoted. The
   *mirror* mode copies in the background (an RPO of seconds; guest writes cost nothing
   extra); the *sync* mode makes each guest write complete only once the DR copy has it
   too (RPO 0; every write pays a round trip to the DR site);
3. **supervision**, once a second (:func:`vmdr.jobs.mirror_state.assess`): a job that
   ended by itself, a tunnel that died (ssh keepalive: 3 s without an answer), or a job
   behind the source without progress for ``stall_s`` seconds → the tunnel is cut (QEMU
   fails the outstanding writes instead of waiting for them), the jobs are aborted (the
   VM stays on its own disks, nothing is pivoted), the state says ``fallback`` with the
   reason, and the loop goes back to 1 after a back-off that doubles per abort in a row;
4. **restore points** every ``point_interval_s`` while the copy is in step: a qcow2
   internal snapshot of every standby disk taken inside the daemon serving them, rotated
   like the snapshot cycles' points.

The state (``mirror.json``) is written at the DR host every few seconds; ``vmdr replicate
status`` derives the achieved RPO and the SLA state from it. SIGTERM (``vmdr replicate
stop VM``) tears everything down cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import (
    DomainNotFound,
    HypervisorError,
    HypervisorUnavailable,
    UsageError,
    VmdrError,
)
from vmdr.events import JobEvents
from vmdr.hypervisor import Hypervisor, connect
from vmdr.hypervisor.mirror import mirror_sockets
from vmdr.hypervisor.remote import private_base
from vmdr.jobs import replica_scripts
from vmdr.jobs.mirror_site import MirrorExport, Tunnel
from vmdr.jobs.mirror_state import (
    COPYING,
    FALLBACK,
    MIRROR_FILE,
    MIRRORING,
    STARTING,
    STOPPED,
    MirrorState,
    Progress,
    assess,
    retry_delay,
)
from vmdr.jobs.replica_throttle import MirrorBandwidth, local_now
from vmdr.jobs.replicate import ReplicaSpec, _save, load_state, redact_uri, replicate_direct
from vmdr.jobs.replicate_site import Site
from vmdr.jobs.replicate_state import (
    ReplicaState,
    RestorePoint,
    point_name,
    to_rotate,
    unique_point,
)
from vmdr.storage.throttle import Windows
from vmdr.timeutil import utcnow

STATE_EVERY_S = 5.0  # mirror.json at the DR host
WRITE_TIMEOUT_S = 10.0


@dataclass
class MirrorOptions:
    synchronous: bool = False
    point_interval_s: float = 300.0  # restore points while mirroring
    retry_s: float = 30.0  # first back-off after an abort (doubles per abort in a row)
    stall_s: float = 15.0  # a job behind the source without progress this long: abort
    poll_s: float = 1.0
    run_for_s: float | None = None  # stop after this long (tests, benchmarks)
    exit_on_abort: bool = False  # the agent: fail the job (alert), its next firing restarts
    bandwidth: Windows | None = None  # --bwlimit: the block jobs' cap, by the clock

    @property
    def mode(self) -> str:
        return "sync" if self.synchronous else "mirror"


@dataclass
class MirrorResult:
    vm: str
    mode: str
    target: str
    cycles: int = 0
    starts: int = 0
    aborts: int = 0
    points: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    state: str = STARTING
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}


def control_path(vm: str) -> str:
    """This host's record of a running supervisor (pid, target) for ``replicate stop``."""
    return os.path.join(private_base(), "mirrors", f"{vm}.json")


def mirror_ident(spec: ReplicaSpec) -> str:
    return replicate_site_id(spec)[-12:]


def replicate_site_id(spec: ReplicaSpec) -> str:
    from vmdr.jobs.replicate_state import replica_prefix

    return replica_prefix(spec.target_uri, spec.directory)


class Supervisor:
    """One VM's continuous mirror (see the module docstring)."""

    def __init__(self, spec: ReplicaSpec, opts: MirrorOptions, source_uri: str,
                 events: JobEvents | None = None, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = local_now) -> None:
        self.spec, self.opts, self.source_uri = spec, opts, source_uri
        self.wall = wall  # local time: which bandwidth window is in force
        self.events = events or JobEvents()
        self.stop = stop or threading.Event()
        self.clock = clock
        self.ms = MirrorState(spec.vm, opts.mode, supervisor=f"{socket.gethostname()}:"
                                                              f"{os.getpid()}")
        self.res = MirrorResult(spec.vm, opts.mode, redact_uri(spec.target_uri))
        self.aborts_in_row = 0
        self._bw_error: str | None = None  # the last failed speed change, said once

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> MirrorResult:
        t0 = self.clock()
        end = None if self.opts.run_for_s is None else t0 + self.opts.run_for_s
        self._control(True)
        try:
            while not self._done(end):
                try:
                    self._round(end)
                except VmdrError as exc:
                    self.res.errors.append(exc.message)
                    self.events.warning(f"continuous replication: {exc.message}",
                                        item=self.spec.vm)
                    if isinstance(exc, UsageError | DomainNotFound) or (
                            self.opts.exit_on_abort and not self._done(end)):
                        raise  # bad input: no point in retrying; or the agent restarts us
                if self._done(end):
                    break
                self.aborts_in_row += 1
                wait = retry_delay(self.aborts_in_row, self.opts.retry_s)
                self.events.phase("fallback", f"{self.spec.vm}: snapshot cycles; the mirror "
                                  f"starts again in {wait:.0f}s", item=self.spec.vm)
                self.stop.wait(wait if end is None else max(0.0, min(wait, end - self.clock())))
        finally:
            self._final_state()
            self._control(False)
        self.res.duration_s = self.clock() - t0
        self.res.state = self.ms.state
        return self.res

    def _done(self, end: float | None) -> bool:
        return self.stop.is_set() or (end is not None and self.clock() >= end)

    def _round(self, end: float | None) -> None:
        """A snapshot cycle, then the mirror until it fails or we stop."""
        spec = self.spec
        target = _connect_target(spec.target_uri)
        try:
            with Site(spec.target_uri) as site:
                self._snapshot_cycle(target, site)
                if self._done(end):
                    return
                st = load_state(site, spec.directory)
                assert st is not None  # the cycle wrote it
                self._mirror(site, st, end)
        finally:
            target.close()

    def _snapshot_cycle(self, target: Hypervisor, site: Site) -> None:
        hv = connect(self.source_uri)
        try:
            self.events.phase("cycle", f"{self.spec.vm}: snapshot cycle", item=self.spec.vm)
            r = replicate_direct(hv, target, site, self.spec)
            self.res.cycles += 1
            if r.point:
                self.res.points.append(r.point)
            for w in r.warnings:
                self.events.warning(w, item=self.spec.vm)
        finally:
            hv.close()

    def _mirror(self, site: Site, st: ReplicaState, end: float | None) -> None:
        spec, opts, ms = self.spec, self.opts, self.ms
        disks = {t: str(d["path"]) for t, d in st.disks.items()}
        hv = connect(self.source_uri)
        jobs: dict[str, Any] = {}
        tunnel: Tunnel | None = None
        why: str | None = None
        exp = MirrorExport(site, disks, writethrough=opts.synchronous)
        bw = MirrorBandwidth(opts.bandwidth, self.wall) if opts.bandwidth else None
        try:
            dom = hv.lookup(spec.vm)
            _check_no_foreign_job(dom, sorted(disks))
            exp.open()
            tunnel = Tunnel(site, exp.remote_socket, mirror_ident(spec)).open()
            ms.move(COPYING, utcnow())
            speed = bw.start(len(disks)) if bw else 0
            for t in sorted(disks):
                jobs[t] = dom.mirror_to_nbd(t, tunnel.socket, t, synchronous=opts.synchronous,
                                            bandwidth=speed)
            ms.starts += 1
            self.res.starts += 1
            how = "synchronous" if opts.synchronous else "asynchronous"
            self.events.phase("mirror", f"{spec.vm}: {how} mirror of "
                              f"{', '.join(sorted(disks))} to {self.res.target}"
                              + (f", at most {_rate(speed)} per disk" if speed else ""),
                              item=spec.vm)
            why = self._supervise(site, st, exp, tunnel, jobs, end, bw)
            if why is not None:
                self.events.warning(f"mirror aborted: {why}; the VM stays on its own disks",
                                    item=spec.vm)
        finally:
            if why is not None and tunnel is not None:
                tunnel.cut()  # the outstanding NBD writes fail now, the abort cannot hang
            for job in jobs.values():
                with contextlib.suppress(VmdrError):
                    job.cancel()
            if tunnel is not None:
                tunnel.close()
            if why is None:
                exp.close()  # the daemon at the DR host quits, the disks are released
            else:
                exp.abandon()  # the link is gone: the next export there replaces it
            hv.close()
        if why is not None:
            ms.aborts += 1
            self.res.aborts += 1
            ms.move(FALLBACK, utcnow(), why)
            self._write_state(site)
            raise HypervisorUnavailable(f"{spec.vm}: mirror aborted: {why}")

    def _supervise(self, site: Site, st: ReplicaState, exp: MirrorExport, tunnel: Tunnel,
                   jobs: dict[str, Any], end: float | None,
                   bw: MirrorBandwidth | None = None) -> str | None:
        """Watch the jobs until we stop (None) or must abort (the reason); follow the
        bandwidth windows (*bw*) by the clock."""
        ms, opts = self.ms, self.opts
        progress: dict[str, Progress] = {}
        last_write = -1e9
        last_point = self.clock()
        cur_at_point = 0
        synced_once = False
        while not self._done(end):
            now = self.clock()
            statuses = []
            for t, job in jobs.items():
                s = job.status()
                statuses.append((t, s.cur, s.end, s.active))
            verdict, why = assess(statuses, tunnel.alive() and exp.alive(), progress, now,
                                  opts.stall_s)
            if verdict == "abort":
                return why
            if bw is not None:
                self._follow(bw, jobs)
            ms.bytes_mirrored = sum(c for _t, c, _e, _a in statuses)
            ms.lag_bytes = sum(e - c for _t, c, e, _a in statuses)
            if verdict == MIRRORING:
                if not synced_once:
                    self.aborts_in_row = 0
                    self.events.phase("in-sync", f"{self.spec.vm}: the DR copy is in step",
                                      item=self.spec.vm)
                synced_once = True
                if ms.state != MIRRORING:
                    ms.move(MIRRORING, utcnow())
                ms.in_sync_at = utcnow().isoformat()
                if now - last_point >= opts.point_interval_s:
                    self._point(site, st, exp, ms.bytes_mirrored - cur_at_point)
                    last_point, cur_at_point = now, ms.bytes_mirrored
            elif ms.state == MIRRORING:
                ms.move(COPYING, utcnow())  # async: fell behind for a moment
            if now - last_write >= STATE_EVERY_S:
                self._write_state(site)
                last_write = now
            self.stop.wait(opts.poll_s)
        return None

    def _follow(self, bw: MirrorBandwidth, jobs: dict[str, Any]) -> None:
        """A bandwidth window opened or closed: the block jobs' new speed."""
        try:
            speed = bw.follow(jobs[t] for t in sorted(jobs))
        except VmdrError as exc:  # tried again at the next poll; said once
            if exc.message != self._bw_error:
                self.events.warning(f"cannot change the mirror's bandwidth: {exc.message}",
                                    item=self.spec.vm)
            self._bw_error = exc.message
            return
        self._bw_error = None
        if speed is not None:
            self.events.phase("bandwidth", f"{self.spec.vm}: mirror bandwidth now "
                              + (f"{_rate(speed)} per disk" if speed else "unlimited"),
                              item=self.spec.vm)

    def _point(self, site: Site, st: ReplicaState, exp: MirrorExport, moved: int) -> None:
        when = utcnow()
        tag = unique_point(point_name(when), [p.name for p in st.points])
        exp.command(f"snap {tag}")
        new = RestorePoint(name=tag, time=when.isoformat(), feed="mirror",
                           mode=self.opts.mode, bytes_moved=max(0, moved))
        try:  # points a test failover reads are not dropped
            pinned = site.pinned_points(self.spec.directory)
        except VmdrError:
            pinned = {p.name for p in st.points}  # unknown: drop none this time
        old = [o for o in to_rotate([*st.points, new], st.keep) if o.name not in pinned]
        for o in old:
            with contextlib.suppress(VmdrError):
                exp.command(f"drop {o.name}")
        st.points = [q for q in [*st.points, new] if q not in old]
        _save(site, st)
        self.res.points.append(tag)
        self.events.phase("point", f"{self.spec.vm}: restore point {tag}", item=self.spec.vm)

    # -- state -----------------------------------------------------------------------------

    def _write_state(self, site: Site) -> None:
        self.ms.updated = utcnow().isoformat()
        path = f"{self.spec.directory}/{MIRROR_FILE}"
        with contextlib.suppress(VmdrError):
            site.run(replica_scripts._WRITE, path, input=self.ms.to_json(),
                     timeout=WRITE_TIMEOUT_S)

    def _final_state(self) -> None:
        if not self.stop.is_set():
            return
        self.ms.move(STOPPED, utcnow())
        with contextlib.suppress(VmdrError), Site(self.spec.target_uri) as site:
            self._write_state(site)

    def _control(self, on: bool) -> None:
        path = control_path(self.spec.vm)
        if on:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "target": redact_uri(self.spec.target_uri),
                           "directory": self.spec.directory, "mode": self.opts.mode}, f)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _rate(bps: int) -> str:
    return f"{bps / (1 << 20):.1f} MiB/s"


def _connect_target(uri: str) -> Hypervisor:
    from vmdr.errors import HypervisorUnavailable

    try:
        return connect(uri)
    except HypervisorUnavailable as exc:
        shown = redact_uri(uri)
        why = " ".join(exc.message.replace(uri, shown).split())
        raise HypervisorUnavailable(f"DR host {shown} unreachable: {why}") from None


def _check_no_foreign_job(dom: Any, disks: list[str]) -> None:
    """Refuse to start when a block job runs on a disk (a backup, an instant-restore copy,
    a mirror of another supervisor): abort only our own leftover (its destination is a
    socket under /run/vmdr/mirror-*)."""
    socks = mirror_sockets(dom.xml())
    for d in disks:
        job = dom.block_job(d)
        if not job.status().active:
            continue
        if "/mirror-" in socks.get(d, "") or "vmdr-mir." in socks.get(d, ""):
            job.cancel()  # a killed supervisor's mirror
            continue
        raise UsageError(f"{dom.name}: disk {d} has a block job running (a backup or "
                         "another copy); start the mirror when it is done")


def stop_supervisor(vm: str, timeout: float = 90.0) -> dict[str, Any]:
    """SIGTERM the supervisor of ``vm`` on this host and wait for it to finish its
    teardown. UsageError (exit 2) if none runs here."""
    path = control_path(vm)
    try:
        with open(path, encoding="utf-8") as f:
            ctl = json.load(f)
        pid = int(ctl["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{vm}: no continuous replication runs on this host") from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise UsageError(f"{vm}: its mirror supervisor (pid {pid}) is gone; a new one "
                         "cleans up its block jobs when it starts") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # done when it removed its control file (after the teardown) or is gone: a
        # supervisor that exited may stay a zombie until its parent reaps it
        if not os.path.exists(path) or not _alive(pid):
            return {"vm": vm, "stopped": True, "pid": pid, **ctl}
        time.sleep(0.2)
    raise HypervisorError(f"{vm}: the mirror supervisor (pid {pid}) did not stop in "
                          f"{timeout:.0f}s")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def abort_leftover(hv: Hypervisor, vm: str) -> list[str]:
    """Abort the mirror jobs a killed supervisor left on ``vm``; the disks aborted."""
    try:
        dom = hv.lookup(vm)
    except DomainNotFound:
        return []
    out = []
    for d, sock in sorted(mirror_sockets(dom.xml()).items()):
        if "/mirror-" in sock or "vmdr-mir." in sock:
            dom.block_job(d).cancel()
            out.append(d)
    return out
