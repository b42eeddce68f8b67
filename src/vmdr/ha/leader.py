"""The leader's failover executor: from an expired lease to the HA VMs running elsewhere.

One :meth:`HALeader.step` per poll (the agent runs it every 0.25 s while it leads and
holds its lease). Everything it decides is in etcd (:mod:`vmdr.ha.store`), so a new leader
resumes where the old one stopped — also for the old leader's own host:

1. **detected** — a host this agent has seen as a member has no member key any more (its
   lease expired, or it stopped): ``ha/failovers/<host>`` is created (only if absent) with
   ``fence_until = now + fence_delay``.
2. **fenced** — after the fence delay the host has destroyed its HA VMs itself (timing
   argument: :mod:`vmdr.ha.settings`); ``fence_command``, if set, runs now as a second
   layer, never waited for.
3. **placed** — :func:`~vmdr.ha.failover.failover_plan` on the live members (capacity from
   their libvirt), hosts in ``ha/maintenance/`` excluded; VMs that fit nowhere: gave-up.
4. **started** — by :func:`~vmdr.ha.boot.due`: a priority group (and a dependent VM) only
   after what it waits for is ready plus its delay. Before every start, libvirt on every
   reachable host is asked whether the VM runs already: then it is not started again.
5. **ready** — the readiness check passed (guest-agent ping by default); the real failover
   is recorded in ``ha/tests/<vm>`` (kind ``real``). No answer within ``ready_timeout``:
   gave-up for that VM's readiness, and its waiters go on.
"""

from __future__ import annotations

import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmdr.ha.boot import Start, due
from vmdr.ha.failover import failover_plan
from vmdr.ha.fencing import FenceResult, run_fence_command
from vmdr.ha.model import ClusterState, HAPolicy, HostState, Readiness, VMState
from vmdr.ha.store import HAStore

__all__ = ["FleetOps", "HALeader", "LiveHost", "domain_size"]

log = logging.getLogger("vmdr.ha")


class FleetOps(Protocol):
    """What the leader needs of the hypervisors (the agent passes libvirt; tests FakeFleet)."""

    def where_running(self, vm: str) -> list[str]:
        """Hosts whose libvirt reports *vm* running now (unreachable hosts are skipped:
        they are fenced by the lease argument)."""

    def start(self, host: str, xml: str) -> None:
        """Define *xml* on *host* and start it."""

    def ready(self, host: str, vm: str, check: str) -> bool:
        """The readiness check (agent | none | tcp:PORT | exec:COMMAND) passes now."""


@dataclass(frozen=True)
class LiveHost:
    name: str
    vcpus: int
    memory_mib: int
    running: tuple[str, ...] = ()


def domain_size(xml: str) -> tuple[int, int]:
    """(vCPUs, memory bytes) of a domain XML; (0, 0) if unreadable."""
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:  # libvirt never writes them
        return 0, 0
    try:
        root = ET.fromstring(xml)  # noqa: S314 - no DTD/entities, see above
    except ET.ParseError:
        return 0, 0
    units = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}
    mem = root.find("memory")
    vcpu = root.find("vcpu")
    try:
        m = int(mem.text or 0) * units.get((mem.get("unit") or "KiB").lower(), 1024) \
            if mem is not None else 0
        v = int(vcpu.text or 0) if vcpu is not None else 0
    except ValueError:
        return 0, 0
    return v, m


def _start(d: dict[str, Any]) -> Start:
    r = d.get("ready") or {}
    return Start(d["vm"], d["host"], int(d["priority"]), int(d["stage"]),
                 tuple(d.get("after") or ()),
                 Readiness(r.get("check", "agent"), float(r.get("delay_s", 0.0)),
                           float(r.get("timeout_s", 300.0))),
                 tuple(d.get("missing_dependencies") or ()))


@dataclass
class HALeader:
    policy: HAPolicy
    store: HAStore
    ops: FleetOps
    me: str
    fence: Callable[[str, str], FenceResult] = run_fence_command
    _noted: set[str] = field(default_factory=set)  # gone hosts already reported
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    placement_s: list[float] = field(default_factory=list)  # the benchmark reads it

    # -- one poll -------------------------------------------------------------------------
    def step(self, now: float, live: dict[str, LiveHost], ever_seen: set[str]) -> None:
        records = self.store.failovers()
        wheres: dict[str, str] = {}
        for host in sorted(set(records) & set(live)):
            if records[host].get("done"):  # back, and its failover finished: forget it
                self.store.delete_failover(host)
                del records[host]
        self._noted &= ever_seen - set(live)
        gone = sorted(ever_seen - set(live) - set(records) - self._noted)
        if gone or any(not r.get("done") and r.get("plan") is None for r in records.values()):
            wheres = self.store.wheres()  # one request, only when there is news
        for host in gone:
            self._noted.add(host)
            victims = sorted(vm for vm, h in wheres.items() if h == host
                             and vm in self.policy.vms)
            rec = {"host": host, "detected": now,
                   "fence_until": now + self.policy.settings.fence_delay, "plan": None,
                   "started": {}, "ready": {}, "failed": {}, "done": False, "by": self.me}
            if not victims:
                self.store.add_event("detected", "member lease gone; no HA VM ran there",
                                     host=host, now=now)
                continue
            if self.store.create_failover(host, rec):
                records[host] = rec
                self.store.add_event(
                    "detected", f"member lease of {host} expired; its HA VMs "
                    f"({', '.join(victims)}) restart after the fence delay "
                    f"({self.policy.settings.fence_delay:g}s)", host=host, now=now,
                    detail={"vms": victims, "fence_until": rec["fence_until"]})
            else:  # another leader (or the fenced host itself) already recorded it
                records[host] = self.store.failover(host) or rec
        for host, rec in sorted(records.items()):
            # also when the host is back: it fenced itself, and it is no target
            if not rec.get("done"):
                self._advance(host, rec, now, live, wheres)

    # -- one failover ---------------------------------------------------------------------
    def _advance(self, host: str, rec: dict[str, Any], now: float,
                 live: dict[str, LiveHost], wheres: dict[str, str]) -> None:
        if now < float(rec["fence_until"]):
            return
        rec.setdefault("failed", {})
        if rec.get("plan") is None:
            self._fenced(host, rec, now)
            plan = self._plan(host, live, wheres)
            rec["plan"] = plan
            self.store.put_failover(host, rec)
            for st in plan["starts"]:
                self.store.add_event("placed", f"{st['vm']} goes to {st['host']} (priority "
                                     f"group {st['priority']}, stage {st['stage']})",
                                     host=st["host"], vm=st["vm"], now=now,
                                     detail={"from": host, "after": st["after"]})
            for u in plan["unplaced"]:
                self.store.add_event("gave-up", f"{u['vm']} cannot be placed: {u['reason']}",
                                     host=host, vm=u["vm"], now=now)
        starts = [_start(d) for d in rec["plan"]["starts"]]
        by_vm = {st.vm: st for st in starts}
        started: dict[str, float] = {k: float(v) for k, v in rec["started"].items()}
        ready: dict[str, float] = {k: float(v) for k, v in rec["ready"].items()}
        released = dict(ready)
        released.update({k: float(v) for k, v in rec["failed"].items()})
        changed = False
        for st in due(starts, now=now, started=started, ready_at=released):
            changed = True
            self._start_one(host, rec, st, now)
        for vm in sorted(rec["started"]):
            if vm in rec["ready"] or vm in rec["failed"]:
                continue
            st = by_vm[vm]
            target = rec.get("hosts", {}).get(vm, st.host)
            if self.ops.ready(target, vm, st.ready.check):
                t = now
                rec["ready"][vm] = t
                changed = True
                t0 = float(rec["detected"])
                self.store.add_event("ready", f"{vm} is ready on {target} ({st.ready.check}"
                                     f"), {t - t0:.1f}s after detection", host=target, vm=vm,
                                     now=t, detail={"ready_s": round(t - t0, 2)})
                self.store.put_test(vm, kind="real", from_=host, to=target,
                                    start_s=round(float(rec["started"][vm]) - t0, 2),
                                    ready_s=round(t - t0, 2), now=t)
            elif now >= float(rec["started"][vm]) + st.ready.timeout:
                rec["failed"][vm] = now
                changed = True
                self.store.add_event("gave-up", f"{vm} not ready within "
                                     f"{st.ready.timeout:g}s; the VMs waiting for it go on",
                                     host=target, vm=vm, now=now)
        if all(st.vm in rec["started"] and (st.vm in rec["ready"] or st.vm in rec["failed"])
               for st in starts):
            rec["done"] = True
            changed = True
            log.info("failover of %s done after %.1fs", host, now - float(rec["detected"]))
        if changed:
            self.store.put_failover(host, rec)

    def _fenced(self, host: str, rec: dict[str, Any], now: float) -> None:
        s = self.policy.settings
        self.store.add_event(
            "fenced", f"{host}: fence delay over; a host that lost its lease destroyed its "
            f"HA VMs {s.self_fence_margin + s.fence_delay:g}s ago at the latest",
            host=host, now=now, detail={"by": "lease", "self_fence_after_s":
                                        s.self_fence_after})
        cmd = s.fence_command
        if cmd:
            def run() -> None:
                r = self.fence(cmd, host)
                self.store.add_event("fenced", f"fence_command for {host}: "
                                     f"{'ok' if r.ok else 'failed'} ({r.output[:200]})",
                                     host=host, detail={"by": "fence_command", "ok": r.ok})
            threading.Thread(target=run, name=f"fence-{host}", daemon=True).start()

    def _plan(self, host: str, live: dict[str, LiveHost],
              wheres: dict[str, str]) -> dict[str, Any]:
        t0 = time.monotonic()
        maint = set(self.store.maintenance())
        hosts = {h.name: HostState(h.name, h.vcpus, h.memory_mib << 20,
                                   maintenance=h.name in maint)
                 for h in live.values() if h.name != host}
        hosts[host] = HostState(host, None, None, up=False)
        vms: dict[str, VMState] = {}
        for lh in live.values():
            for vm in lh.running:
                vms[vm] = VMState(vm, lh.name, *self._size(vm))
        for vm, where in wheres.items():
            if vm in self.policy.vms and (where == host or vm not in vms):
                vms[vm] = VMState(vm, where, *self._size(vm),
                                  running=where == host or where in live)
        plan = failover_plan(self.policy, ClusterState(hosts, vms), {host}).to_json()
        self.placement_s.append(time.monotonic() - t0)
        return plan

    def _size(self, vm: str) -> tuple[int, int]:
        if vm not in self.policy.vms:
            return 0, 0
        if vm not in self._sizes:  # one bulk read of every stored XML, then cached
            for name, xml in self.store.domains().items():
                self._sizes[name] = domain_size(xml)
            self._sizes.setdefault(vm, (0, 0))
        return self._sizes[vm]

    def _start_one(self, host: str, rec: dict[str, Any], st: Start, now: float) -> None:
        t0 = float(rec["detected"])
        running = self.ops.where_running(st.vm)
        if running:
            rec["started"][st.vm] = now
            rec.setdefault("hosts", {})[st.vm] = running[0]
            self.store.add_event("gave-up", f"{st.vm} not started: libvirt reports it "
                                 f"running on {', '.join(running)}", host=running[0],
                                 vm=st.vm, now=now, detail={"running_on": running})
            self.store.put_failover(host, rec)
            return
        xml = self.store.domain(st.vm)
        if xml is None:
            rec["failed"][st.vm] = now
            self.store.add_event("gave-up", f"{st.vm}: no stored domain XML", host=st.host,
                                 vm=st.vm, now=now)
            self.store.put_failover(host, rec)
            return
        try:
            self.ops.start(st.host, xml)
        except Exception as exc:
            rec["failed"][st.vm] = now
            self.store.add_event("gave-up", f"{st.vm}: start on {st.host} failed: {exc}",
                                 host=st.host, vm=st.vm, now=now)
            self.store.put_failover(host, rec)
            return
        rec["started"][st.vm] = now
        rec.setdefault("hosts", {})[st.vm] = st.host
        self.store.put_failover(host, rec)
        self.store.put_where(st.vm, st.host, now)
        missing = f"; dependencies not restarted: {', '.join(st.missing)}" if st.missing \
            else ""
        self.store.add_event("started", f"{st.vm} started on {st.host}, {now - t0:.1f}s "
                             f"after detection{missing}", host=st.host, vm=st.vm, now=now,
                             detail={"from": host, "start_s": round(now - t0, 2),
                                     "priority": st.priority, "after": list(st.after)})
