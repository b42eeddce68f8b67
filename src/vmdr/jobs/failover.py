"""``vmdr failover PLAN [--planned | --test | --point TIME]``: bring a recovery plan up at
the DR site from its replicas.

* **test** (``--test``): every VM of the plan starts at the DR site as a transient copy
  ``vmdrt-<plan>-<vm>`` on throw-away qcow2 overlays over its standby disks, in an
  isolated network with no uplink (the plan's ``test_network_map``, else a bubble
  ``vmdrt<hash>`` created for the run), group by group with the readiness checks, re-IP
  to the rules' ``test_to`` subnets, a screenshot each; then everything is removed and
  the removal is checked. Production and its replica are not touched, and replication
  goes on: the copies read a pinned, read-only export of the newest restore point, not
  the standby disks (:mod:`.failover_site`), and the replica lock is held only while the
  point is pinned, so replica cycles run and add restore points during the test.
* **planned** (``--planned``): refuses a replica older than its RPO target (``--force``),
  runs the plan's ``guest:`` pre-scripts in the running sources, shuts the sources down
  cleanly (reverse boot order), runs a final replica cycle of each (zero data loss), then
  starts the standbys group by group. Any failure before the first standby is ready puts
  the sources back up and leaves the standbys stopped.
* **unplanned** (no flag): the source site is gone. Refuses while a source VM still runs
  at the source (never a VM running at both sites); each standby is set to its newest
  restore point (or the newest at or before ``--point``), and the data lost per VM is
  that point's age.

A failover starts each standby on a qcow2 overlay ``<replica dir>/failover/<disk>.qcow2``
over its disks, recorded in ``<replica dir>/failover.json``: the changes made at the DR
site stay apart, so ``vmdr failback`` moves only those back (:mod:`.failback`).

A plan lock (``recovery-plan:<name>``, as the per-VM lock) refuses a second failover or
failback of the same plan (exit 13). Every run writes a report (JSON + HTML) to the
reports directory, also when it fails.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from vmdr.errors import (
    DRCapacity,
    FailoverFailed,
    RecoveryPlanLocked,
    ReplicaStale,
    UsageError,
    VmdrError,
    VMLocked,
)
from vmdr.hypervisor import Domain, Hypervisor, connect
from vmdr.jobs import failover_site as fs
from vmdr.jobs.failover_guest import reip, run_script, wait_ready
from vmdr.jobs.replicate import ReplicaSpec, load_state, redact_uri, replicate_direct
from vmdr.jobs.vmlock import VMLock
from vmdr.plan import recovery_runs as runs
from vmdr.plan.recovery import GroupSpec, RecoveryPlan
from vmdr.timeutil import utcnow

KINDS = ("test", "planned", "unplanned")
LOCK_WAIT_S = 120.0  # a test failover waits this long for a running replica cycle
FAILOVER_STATE = "failover.json"
_FAILOVER_OVERLAY = r"""set -e
d=$1; shift
mkdir -p -m 0755 -- "$d"
while [ "$#" -gt 1 ]; do
  rm -f -- "$2"
  qemu-img create -q -f qcow2 -F qcow2 -b "$1" -- "$2"
  chmod 0644 -- "$2"
  shift 2
done
"""


@dataclass
class Options:
    kind: str  # test | planned | unplanned
    reports: str
    source_uri: str = "qemu:///system"  # VMs whose inventory host has no uri
    point: datetime | None = None
    force: bool = False
    scratch_dir: str = "/var/lib/libvirt/qemu/vmdr"
    screenshots: bool = True
    log: Callable[[str], None] = lambda _m: None


@dataclass
class Outcome:
    report: runs.RunReport
    json_path: str
    html_path: str
    error: VmdrError | None = None


class PlanLock:
    """One failover or failback of a plan at a time (exit 13 names the plan)."""

    def __init__(self, plan: str) -> None:
        self.lock = VMLock("recovery-plan", plan)
        self.plan = plan

    def __enter__(self) -> PlanLock:
        try:
            self.lock.acquire()
        except VMLocked:
            raise RecoveryPlanLocked(f"recovery plan {self.plan}: another failover or failback "
                                     "of it is running; try again when it is done") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


@dataclass
class Run:
    """A run in progress: its report, timings and what to undo."""

    plan: RecoveryPlan
    opts: Options
    report: runs.RunReport
    t0: float = field(default_factory=time.monotonic)
    # the failover's start to the microsecond (the report's ``started`` has whole
    # seconds): the data lost is measured from it
    started_at: datetime = field(default_factory=utcnow)

    @contextmanager
    def step(self, name: str, vm: str | None = None) -> Iterator[runs.Step]:
        s = runs.Step(name, utcnow().isoformat(timespec="seconds"), vm=vm)
        self.report.steps.append(s)
        t = time.monotonic()
        self.opts.log(f"{name}{f' {vm}' if vm else ''}")
        try:
            yield s
        except VmdrError as exc:
            s.status, s.detail = "failed", exc.message
            raise
        finally:
            s.duration_s = round(time.monotonic() - t, 2)

    def env(self, group: GroupSpec | None = None) -> dict[str, str]:
        return {"VMDR_PLAN": self.plan.name, "VMDR_RUN": self.report.run,
                "VMDR_KIND": self.report.kind,
                "VMDR_GROUP": str(group.number) if group else "",
                "VMDR_VMS": " ".join(group.vms if group else self.plan.order())}


def start_report(plan: RecoveryPlan, kind: str) -> runs.RunReport:
    now = utcnow()
    return runs.RunReport(
        runs.run_id(now, plan.name, kind), plan.name, kind, now.isoformat(timespec="seconds"),
        dr_hosts=sorted({redact_uri(v.to) for v in plan.vms.values()}),
        vms=[runs.VMOutcome(vm, group=plan.group_of(vm).number) for vm in plan.order()])


def finish(run: Run, error: VmdrError | None) -> Outcome:
    rep = run.report
    rep.finished = utcnow().isoformat(timespec="seconds")
    rep.duration_s = round(time.monotonic() - run.t0, 2)
    rep.outcome = "failed" if error else "passed"
    rep.error = error.message if error else None
    try:
        js, html = runs.write(run.opts.reports, rep)
    except OSError as exc:
        why = UsageError(f"cannot write the report to {run.opts.reports}: {exc.strerror} "
                         f"(the {rep.kind} run itself {rep.outcome}; set [recovery] reports)")
        return Outcome(rep, "", "", error or why)
    return Outcome(rep, js, html, error)


def failover(plan: RecoveryPlan, opts: Options) -> Outcome:
    """Run one failover of ``plan`` (see the module docstring); the report is written
    whatever happens. A refused start (lock, stale replica, bad input) raises before any
    report when nothing was touched."""
    if opts.kind not in KINDS:
        raise UsageError(f"unknown failover kind {opts.kind!r}")
    if opts.point is not None and opts.kind != "unplanned":
        raise UsageError("--point is for an unplanned failover (the newest point is used "
                         "otherwise)")
    rep = start_report(plan, opts.kind)
    rep.forced = opts.force
    run = Run(plan, opts, rep)
    with PlanLock(plan.name), fs.Sites() as sites:
        error: VmdrError | None = None
        try:
            vms = _load(run, sites)
            if opts.kind == "test":
                _test(run, vms)
            elif opts.kind == "planned":
                _planned(run, sites, vms)
            else:
                _unplanned(run, vms)
        except VmdrError as exc:
            error = exc
        return finish(run, error)


def _load(run: Run, sites: fs.Sites) -> dict[str, fs.DRVM]:
    out = {}
    with run.step("load the replicas at the DR site"):
        for name in run.plan.order():
            pv = run.plan.vms[name]
            out[name] = fs.load_vm(sites, pv)
            vm = out[name]
            if run.opts.kind != "test" and vm.standby.is_active():
                raise UsageError(f"{name}: the standby {vm.state.standby} already runs at "
                                 f"{redact_uri(pv.to)} (failed over already?)")
            fs.check_networks(vm, vm.dr_networks())
            newest = vm.state.newest
            assert newest is not None
            age = (utcnow() - datetime.fromisoformat(newest.time)).total_seconds()
            target = run.plan.rpo_target(name)
            o = run.report.vm(name)
            o.point, o.point_time, o.rpo_s = newest.name, newest.time, round(age, 1)
            if target is not None and age > target and run.opts.kind == "planned":
                msg = (f"{name}: the replica's newest point is {age:.0f}s old, older than "
                       f"its RPO target {target:.0f}s")
                if not run.opts.force:
                    raise ReplicaStale(msg + ": check replication (`vmdr replicate status`), "
                                       "or --force")
                run.report.warnings.append(msg + " (forced)")
        _check_capacity(run, out)
    return out


def _check_capacity(run: Run, vms: dict[str, fs.DRVM]) -> None:
    """DRCapacity (exit 43) before anything is stopped or started when the plan's standbys
    need more memory than their DR host has free (``--force``: a warning)."""
    need: dict[str, int] = {}
    hvs: dict[str, Hypervisor] = {}
    for vm in vms.values():
        need[vm.pv.to] = need.get(vm.pv.to, 0) + vm.standby.info().memory_kib * 1024
        hvs[vm.pv.to] = vm.hv
    for uri, n in need.items():
        free = hvs[uri].free_memory()
        if free is None or n <= free:
            continue
        msg = (f"recovery plan {run.plan.name}: the VMs need {n >> 20} MiB of memory at "
               f"{redact_uri(uri)}, which has {free >> 20} MiB free")
        if not run.opts.force:
            raise DRCapacity(msg + ": nothing was stopped or started (free memory there, "
                             "or --force)")
        run.report.warnings.append(msg + " (forced)")


# -- bring-up, shared by every kind -------------------------------------------------------------


def bring_up(run: Run, doms: dict[str, Domain], start: Callable[[str], Domain],
             ready_on: Callable[[str, str, int], int], test: bool = False) -> None:
    """Start the plan group by group: host pre-scripts, start, readiness, re-IP, post
    scripts, delay. ``start(vm)`` starts one VM and returns its domain."""
    plan = run.plan
    for g in plan.groups:
        for s in g.pre:
            if s.startswith("host:"):
                with run.step(f"group {g.number} pre-script", None) as st:
                    st.detail = run_script(s, [], run.env(g))
        t_start: dict[str, float] = {}
        for name in g.vms:
            with run.step("start", name) as st:
                doms[name] = start(name)
                t_start[name] = time.monotonic()
                st.detail = doms[name].name
        for name in g.vms:
            o = run.report.vm(name)
            # a TCP port is checked at the address the VM serves on: re-IP first (it
            # needs the guest agent), then the port
            steps = [g.ready]
            if plan.reip_rules and g.ready.startswith("tcp:"):
                steps = ["agent", "re-IP", g.ready]
            elif plan.reip_rules:
                steps = [g.ready, "re-IP"]
            for what in steps:
                if what == "re-IP":
                    with run.step("re-IP", name) as st:
                        o.addresses = reip(doms[name], plan.reip_rules, plan.reip_helper,
                                           test)
                        st.detail = ", ".join(o.addresses) or "no address"
                    continue
                with run.step(f"wait until ready ({what})", name) as st:
                    try:
                        r = wait_ready(doms[name], what, g.timeout_s,
                                       lambda a, p, n=name: ready_on(n, a, p),
                                       {**run.env(g), "VMDR_VM": name})
                    except VmdrError as exc:
                        o.outcome, o.error = "failed", exc.message
                        raise
                    o.ready, o.ready_s = g.ready, round(time.monotonic() - t_start[name], 1)
                    st.detail = f"ready after {o.ready_s}s ({r.seconds:.1f}s of checks)"
            o.rto_s = round(time.monotonic() - run.t0, 1)
            o.outcome = "ready"
        for s in g.post:
            with run.step(f"group {g.number} post-script") as st:
                st.detail = run_script(s, [doms[n] for n in g.vms], run.env(g))
        if g.delay_s:
            with run.step(f"group {g.number} delay", None) as st:
                time.sleep(g.delay_s)
                st.detail = f"{g.delay_s:.0f}s"


def _screens(run: Run, doms: dict[str, Domain]) -> None:
    if not run.opts.screenshots:
        return
    for name, dom in doms.items():
        try:
            shot = dom.console().screenshot()
        except VmdrError as exc:
            run.report.warnings.append(f"{name}: no screenshot ({exc.message})")
            continue
        ext = "png" if "png" in shot.mime else "ppm"
        fname = f"{run.report.run}-{name}.{ext}"
        try:
            os.makedirs(run.opts.reports, mode=0o755, exist_ok=True)
            with open(os.path.join(run.opts.reports, fname), "wb") as f:
                f.write(shot.data)
        except OSError as exc:
            run.report.warnings.append(f"{name}: screenshot not saved ({exc.strerror})")
            continue
        run.report.vm(name).screenshot = fname


# -- test ---------------------------------------------------------------------------------------


def _test(run: Run, vms: dict[str, fs.DRVM]) -> None:
    plan = run.plan
    bubble = fs.bubble_name(plan.name)
    bubbles: dict[str, Hypervisor] = {}
    dirs: dict[str, str] = {}
    doms: dict[str, Domain] = {}
    try:
        with run.step("freeze the restore points (replica cycles go on)") as st:
            for name, vm in vms.items():
                dirs[name] = fs.test_dir(vm, run.report.run)  # removed even if half made
                _freeze(run, vm)
            st.detail = ", ".join(f"{n} {v.point}" for n, v in vms.items())
        nets: dict[str, dict[str, str]] = {}
        with run.step("prepare the test bubble"):
            for name, vm in vms.items():
                nets[name] = fs.test_networks(vm, plan, bubble)
                if bubble in nets[name].values() and vm.pv.to not in bubbles:
                    fs.create_bubble(vm.hv, bubble)
                    bubbles[vm.pv.to] = vm.hv

        def start(name: str) -> Domain:
            fs.start_test_copy(vms[name], plan.name, run.report.run, nets[name])
            d = vms[name].dom
            assert d is not None
            return d

        bring_up(run, doms, start, lambda n, a, p: vms[n].tcp_probe(a, p), test=True)
        with run.step("screenshots"):
            _screens(run, doms)
    finally:
        left: list[str] = []
        with run.step("clean up (test copies, overlays, network)") as st:
            for name, vm in vms.items():
                left += fs.remove_test_copy(vm, plan.name, dirs.get(name))
            for hv in bubbles.values():
                hv.destroy_network(bubble)
                try:
                    hv.network(bubble)
                    left.append(f"network {bubble}")
                except VmdrError:
                    pass
            st.detail = "nothing left" if not left else "left: " + ", ".join(left)
            if left:
                st.status = "failed"
        for o in run.report.vms:
            if o.outcome == "pending":
                o.outcome = "skipped"
    if left:
        raise FailoverFailed(f"the test left {', '.join(left)} behind")


def _freeze(run: Run, vm: fs.DRVM) -> None:
    """Pin the replica's newest restore point and serve it read-only to the test copy.
    The replica lock is held only for this (a cycle that runs waits up to
    ``LOCK_WAIT_S``); replica cycles go on while the test copy runs."""
    lk = VMLock(f"replica:{redact_uri(vm.pv.to)}:{vm.pv.directory}", vm.name)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            lk.acquire()
            break
        except VMLocked:
            if time.monotonic() > deadline:
                raise VMLocked(f"{vm.name}: a replica cycle has been running for over "
                               f"{LOCK_WAIT_S:.0f}s; test when it is done") from None
            time.sleep(1.0)
    try:
        for what in fs.cleanup_leftovers(vm, run.plan.name):
            run.report.warnings.append(f"removed a leftover test copy: {what}")
        st = load_state(vm.site, vm.pv.directory)  # a cycle may have ended since _load
        if st is not None and st.standby_uuid == vm.state.standby_uuid and st.points:
            vm.state = st
        point = vm.state.newest
        assert point is not None
        o = run.report.vm(vm.name)
        o.point, o.point_time = point.name, point.time
        o.rpo_s = round((utcnow() - datetime.fromisoformat(point.time)).total_seconds(), 1)
        fs.freeze(vm, run.report.run, point)
    finally:
        lk.release()


# -- planned and unplanned ----------------------------------------------------------------------


def _source_hv(run: Run, sources: dict[str, Hypervisor], name: str) -> Hypervisor:
    uri = run.plan.vms[name].source_uri or run.opts.source_uri
    if uri not in sources:
        sources[uri] = connect(uri)
    return sources[uri]


def _start_on_overlay(run: Run, vm: fs.DRVM, point: str, src_uri: str, *,
                      source_autostart: bool = False) -> Domain:
    """Start the standby on fresh overlays over its disks (the DR site's changes stay
    apart for failback); records failover.json."""
    d = f"{vm.pv.directory}/failover"
    pairs: list[str] = []
    paths = {}
    for t, disk in sorted(vm.state.disks.items()):
        pairs += [str(disk["path"]), f"{d}/{t}.qcow2"]
        paths[t] = f"{d}/{t}.qcow2"
    vm.site.run(_FAILOVER_OVERLAY, d, *pairs)
    from vmdr.hypervisor import rewrite_domain_xml

    xml = vm.standby.xml(inactive=True)
    new = rewrite_domain_xml(xml, new_name=vm.state.standby, new_uuid=False, new_macs=False,
                             disk_paths={t: (p, "qcow2") for t, p in paths.items()})
    rec = {"run": run.report.run, "kind": run.report.kind, "point": point,
           "overlays": paths, "base": {t: str(x["path"]) for t, x in vm.state.disks.items()},
           "standby_xml": xml, "source_uri": redact_uri(src_uri), "time": utcnow().isoformat(),
           "source_autostart": source_autostart}  # failback turns it on again
    vm.site.write(f"{vm.pv.directory}/{FAILOVER_STATE}", json.dumps(rec, indent=1).encode())
    vm.started_here = True  # from here on a roll-back restores the standby's definition
    vm.hv.define(new)
    dom = vm.hv.lookup(vm.state.standby)
    vm.dom = dom
    dom.start()
    return dom


def _planned(run: Run, sites: fs.Sites, vms: dict[str, fs.DRVM]) -> None:
    plan = run.plan
    sources: dict[str, Hypervisor] = {}
    stopped: list[str] = []
    autostart_off: list[str] = []
    src_doms: dict[str, Domain] = {}
    doms: dict[str, Domain] = {}
    try:
        with run.step("check the source VMs"):
            for name in plan.order():
                src_doms[name] = _source_hv(run, sources, name).lookup(name)
        for g in reversed(plan.groups):
            running = [src_doms[n] for n in g.vms if src_doms[n].is_active()]
            for s in g.pre:
                if s.startswith("guest:") and running:
                    with run.step(f"group {g.number} pre-script in the sources") as st:
                        st.detail = run_script(s, running, run.env(g))
        for g in reversed(plan.groups):
            for name in reversed(g.vms):
                dom = src_doms[name]
                with run.step("shut down the source", name) as st:
                    if not dom.is_active():
                        st.detail = "already off"
                        continue
                    dom.shutdown()
                    stopped.append(name)
                    _wait_off(dom, plan.shutdown_timeout_s)
                    st.detail = "shut off cleanly"
        for name in plan.order():
            # a source host that reboots must not start the VM beside its DR copy
            dom = src_doms[name]
            if dom.is_persistent() and dom.autostart():
                with run.step("turn the source's autostart off", name) as st:
                    dom.set_autostart(False)
                    autostart_off.append(name)
                    st.detail = "libvirt autostart off until failback"
        for name in plan.order():
            vm = vms[name]
            with run.step("final replica cycle", name) as st:
                spec = ReplicaSpec(
                    vm=name, target_uri=vm.pv.to, directory=vm.pv.directory,
                    standby=vm.state.standby, keep=vm.state.keep, feed="direct",
                    rpo_target_s=vm.state.rpo_target_s, network_map=vm.state.network_map,
                    consistency="crash", scratch_dir=run.opts.scratch_dir)
                res = replicate_direct(_source_hv(run, sources, name), vm.hv, vm.site, spec)
                st.detail = f"{res.mode}, {res.bytes_moved} bytes, point {res.point}"
                fresh = fs.load_vm(sites, vm.pv)
                vm.state, vm.standby = fresh.state, fresh.standby
                o = run.report.vm(name)
                o.point, o.point_time, o.rpo_s = res.point, res.point_time, 0.0
                o.records_note = "final cycle after a clean shutdown: no data lost"
        for name in plan.order():
            if src_doms[name].is_active():
                raise FailoverFailed(f"{name} runs again at the source site; not starting "
                                     "it at the DR site too")

        def start(name: str) -> Domain:
            p = run.report.vm(name).point or ""
            return _start_on_overlay(run, vms[name], p, _source_hv(run, sources, name).uri,
                                     source_autostart=name in autostart_off)

        bring_up(run, doms, start, lambda n, a, p: vms[n].tcp_probe(a, p))
        with run.step("screenshots"):
            _screens(run, doms)
    except VmdrError as exc:
        for name in autostart_off:  # the sources run again: as they were
            try:
                src_doms[name].set_autostart(True)
            except VmdrError as aexc:
                run.report.warnings.append(f"could not turn {name}'s autostart on again: "
                                           f"{aexc.message}")
        _roll_back(run, vms, [src_doms[n] for n in stopped if n in src_doms])
        if isinstance(exc, FailoverFailed):
            raise
        raise FailoverFailed(f"planned failover of {plan.name} failed: {exc.message}; the "
                             "sources were left running") from exc
    finally:
        for h in sources.values():
            h.close()


def _wait_off(dom: Domain, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while dom.is_active():
        if time.monotonic() > deadline:
            raise FailoverFailed(f"{dom.name} did not shut down within {timeout:.0f}s "
                                 "(guest agent or ACPI not answering?)")
        time.sleep(0.5)


def _roll_back(run: Run, vms: dict[str, fs.DRVM], sources: list[Domain]) -> None:
    """Stop what this run started at the DR site, restore the standby definitions, start
    the sources it stopped again."""
    with run.step("roll back") as st:
        done = []
        for vm in vms.values():
            if vm.started_here:
                try:  # the sources come back below whatever happens here
                    if vm.dom is not None:
                        vm.dom.destroy()
                    _restore_standby(vm)
                    done.append(f"stopped {vm.name} at the DR site")
                except VmdrError as exc:
                    run.report.warnings.append(f"{vm.name}: roll-back at the DR site: "
                                               f"{exc.message}")
                run.report.vm(vm.name).outcome = "rolled-back"
        for dom in reversed(sources):
            try:
                if not dom.is_active():
                    dom.start()
                    done.append(f"started {dom.name} at the source again")
            except VmdrError as exc:
                run.report.warnings.append(f"could not start {dom.name} again: {exc.message}")
        st.detail = "; ".join(done) or "nothing to undo"


def _restore_standby(vm: fs.DRVM) -> None:
    """Point the standby at its own disks again and drop the failover overlays."""
    raw = vm.site.read(f"{vm.pv.directory}/{FAILOVER_STATE}")
    if raw is None:
        return
    rec = json.loads(raw)
    vm.hv.define(rec["standby_xml"])
    vm.site.run('rm -rf -- "$1/failover" "$1/failover.json"', vm.pv.directory)


def _unplanned(run: Run, vms: dict[str, fs.DRVM]) -> None:
    plan = run.plan
    with run.step("make sure the sources are down") as st:
        notes = []
        for name in plan.order():
            uri = plan.vms[name].source_uri or run.opts.source_uri
            try:
                hv = connect(uri)
            except VmdrError as exc:
                notes.append(f"{name}: source host unreachable ({exc.message})")
                continue
            try:
                try:
                    running = hv.lookup(name).is_active()
                except VmdrError:
                    running = False
                if running:
                    raise FailoverFailed(
                        f"{name} still runs at the source site ({redact_uri(uri)}): use "
                        "--planned, or stop it first (never a VM running at both sites)")
                notes.append(f"{name}: not running at the source")
            finally:
                hv.close()
        st.detail = "; ".join(notes)
    started = run.started_at
    for name in plan.order():
        vm = vms[name]
        with run.step("set the restore point", name) as st:
            p = fs.choose_point(vm.state, run.opts.point)
            fs.revert(vm, p)
            o = run.report.vm(name)
            o.point, o.point_time = p.name, p.time
            o.rpo_s = round(max(0.0, (started - datetime.fromisoformat(p.time))
                                .total_seconds()), 1)
            o.records_note = f"data written after {p.time} is lost (up to {o.rpo_s:.0f}s)"
            st.detail = f"{p.name} ({o.rpo_s:.0f}s before the failover)"
    doms: dict[str, Domain] = {}

    def start(name: str) -> Domain:
        return _start_on_overlay(run, vms[name], run.report.vm(name).point or "",
                                 plan.vms[name].source_uri or run.opts.source_uri)

    bring_up(run, doms, start, lambda n, a, p: vms[n].tcp_probe(a, p))
    with run.step("screenshots"):
        _screens(run, doms)
