"""``vmdr failback PLAN``: back to the source site after a failover, then re-protect.

1. the source VMs must be off (never a VM running at both sites);
2. the VMs at the DR site shut down cleanly (reverse boot order);
3. **reverse replication**: after a planned failover the source disks still hold the
   state of the failover point, and everything the DR site wrote since sits in the
   failover overlays (``<replica dir>/failover/<disk>.qcow2``): only the ranges
   allocated in those overlays move back (``qemu-img map``, depth 0), written into the
   source disks through an NBD export at the source host (the replica machinery's
   :meth:`~vmdr.jobs.replicate_site.Site.writer`, in the other direction). After an
   unplanned failover the source may hold writes the DR site never saw, so the whole
   disk moves (data ranges, holes as zeroes);
4. the sources start group by group with the plan's readiness checks (a planned failover
   back). If that fails, the sources are stopped and the DR VMs started again;
5. **re-protect**: the overlays are committed into the standby disks, the standby gets
   its own definition back, and a replica cycle in the original direction takes a new
   restore point (incremental: the source's checkpoint survived).
"""

from __future__ import annotations

import json
import time
from typing import Any

from vmdr.errors import FailoverFailed, UsageError, VmdrError
from vmdr.hypervisor import Domain, Hypervisor, connect
from vmdr.jobs import failover_site as fs
from vmdr.jobs.failover import (
    FAILOVER_STATE,
    Options,
    Outcome,
    PlanLock,
    Run,
    _screens,
    _wait_off,
    bring_up,
    finish,
    start_report,
)
from vmdr.jobs.replicate import ReplicaSpec, redact_uri, replicate_direct
from vmdr.jobs.replicate_state import pieces
from vmdr.plan.recovery import RecoveryPlan

_MAP = r"""qemu-img map --output=json -U -- "$1"
"""
_COMMIT = r"""set -e
qemu-img commit -q -- "$1"
"""


def failback(plan: RecoveryPlan, opts: Options) -> Outcome:
    opts.kind = "failback"
    rep = start_report(plan, "failback")
    run = Run(plan, opts, rep)
    with PlanLock(plan.name), fs.Sites() as sites:
        error: VmdrError | None = None
        try:
            _failback(run, sites)
        except VmdrError as exc:
            error = exc
        return finish(run, error)


def _records(run: Run, sites: fs.Sites) -> tuple[dict[str, fs.DRVM], dict[str, dict[str, Any]]]:
    vms, recs = {}, {}
    for name in run.plan.order():
        vm = fs.load_vm(sites, run.plan.vms[name])
        raw = vm.site.read(f"{vm.pv.directory}/{FAILOVER_STATE}")
        if raw is None:
            raise UsageError(f"{name}: not failed over (no {FAILOVER_STATE} in "
                             f"{vm.pv.directory} on {redact_uri(vm.pv.to)})")
        vms[name], recs[name] = vm, json.loads(raw)
    return vms, recs


def _failback(run: Run, sites: fs.Sites) -> None:
    plan = run.plan
    with run.step("load the failed-over VMs"):
        vms, recs = _records(run, sites)
    sources: dict[str, Hypervisor] = {}
    src: dict[str, Domain] = {}
    started_src: list[Domain] = []
    stopped_dr: list[fs.DRVM] = []
    try:
        with run.step("check the source VMs are off"):
            for name in plan.order():
                uri = plan.vms[name].source_uri or run.opts.source_uri
                if uri not in sources:
                    sources[uri] = connect(uri)
                src[name] = sources[uri].lookup(name)
                if src[name].is_active():
                    raise FailoverFailed(f"{name} runs at the source site: stop it first "
                                         "(never a VM running at both sites)")
        for g in reversed(plan.groups):
            for name in reversed(g.vms):
                vm = vms[name]
                with run.step("shut down at the DR site", name) as st:
                    if not vm.standby.is_active():
                        st.detail = "already off"
                        continue
                    vm.standby.shutdown()
                    stopped_dr.append(vm)
                    _wait_off(vm.standby, plan.shutdown_timeout_s)
                    st.detail = "shut off cleanly"
        for name in plan.order():
            with run.step("reverse replication", name) as st:
                moved, zeroed, how = _copy_back(vms[name], recs[name], src[name],
                                                sites.site(_uri(run, name)))
                st.detail = f"{how}: {moved} bytes moved, {zeroed} bytes zeroed"
                o = run.report.vm(name)
                o.rpo_s, o.records_note = 0.0, f"{how}; nothing written at the DR site lost"

        def start(name: str) -> Domain:
            src[name].start()
            started_src.append(src[name])
            return src[name]

        bring_up(run, {}, start, lambda n, a, p: sites.site(_uri(run, n)).run(
            fs._TCP, a, str(p), ok=(0, 1, 2, 124, 127)).returncode)
        with run.step("screenshots"):
            _screens(run, {n: src[n] for n in plan.order()})
    except VmdrError as exc:
        with run.step("roll back") as st:
            for d in started_src:
                d.destroy()
            for vm in stopped_dr:
                vm.standby.start()
            st.detail = (f"stopped {len(started_src)} source VM(s), started "
                         f"{len(stopped_dr)} DR VM(s) again")
        for h in sources.values():
            h.close()
        if isinstance(exc, FailoverFailed):
            raise
        raise FailoverFailed(f"failback of {plan.name} failed: {exc.message}; the VMs run "
                             "at the DR site as before") from exc
    for name in plan.order():  # as it was before the planned failover turned it off
        if recs[name].get("source_autostart"):
            with run.step("turn the source's autostart on again", name) as st:
                src[name].set_autostart(True)
                st.detail = "libvirt autostart on"
    try:
        for name in plan.order():
            with run.step("re-protect", name) as st:
                st.detail = _reprotect(run, vms[name], recs[name], sources[_uri(run, name)])
    finally:
        for h in sources.values():
            h.close()


def _uri(run: Run, name: str) -> str:
    return run.plan.vms[name].source_uri or run.opts.source_uri


def _copy_back(vm: fs.DRVM, rec: dict[str, Any], src: Domain,
               src_site: Any) -> tuple[int, int, str]:
    disks = {d.target: d for d in src.info().disks if d.device in ("disk", "lun")}
    delta = rec.get("kind") == "planned"
    moved = zeroed = 0
    for t, overlay in sorted(rec["overlays"].items()):
        d = disks.get(t)
        if d is None or not d.source:
            raise UsageError(f"{vm.name}: the source has no disk {t} any more")
        entries = json.loads(vm.site.run(_MAP, overlay).stdout)
        reader = vm.site.writer(overlay)
        writer = src_site.writer(d.source, d.format or "raw")
        ok = False
        try:
            for e in entries:
                if delta and e.get("depth", 0) != 0:
                    continue  # not written at the DR site since the failover
                off, ln = int(e["start"]), int(e["length"])
                if not e.get("data"):
                    writer.zero(off, ln)
                    zeroed += ln
                    continue
                for o, n in pieces([(off, ln)]):
                    writer.write(o, reader.read(o, n))
                    moved += n
            ok = True
        finally:
            writer.close(flush=ok)
            reader.close(flush=False)
    return moved, zeroed, ("changes made at the DR site since the failover" if delta
                           else "whole disks (the failover was unplanned)")


def _reprotect(run: Run, vm: fs.DRVM, rec: dict[str, Any], src_hv: Hypervisor) -> str:
    for overlay in rec["overlays"].values():
        vm.site.run(_COMMIT, overlay)
    vm.hv.define(rec["standby_xml"])
    vm.site.run('rm -rf -- "$1/failover" "$1/failover.json"', vm.pv.directory)
    spec = ReplicaSpec(vm=vm.name, target_uri=vm.pv.to, directory=vm.pv.directory,
                       standby=vm.state.standby, keep=vm.state.keep, feed="direct",
                       rpo_target_s=vm.state.rpo_target_s, network_map=vm.state.network_map,
                       scratch_dir=run.opts.scratch_dir)
    t = time.monotonic()
    res = replicate_direct(src_hv, vm.hv, vm.site, spec)
    return (f"overlays committed into the standby; replica cycle {res.mode}, "
            f"{res.bytes_moved} bytes, point {res.point} in {time.monotonic() - t:.1f}s")
