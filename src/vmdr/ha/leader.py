"""The leader's failover executor: from an expired lease to the HA VMs running elsewhere.

One :meth:`HALeader.step` per poll (the agent runs it every 0.25 s while it leads and
holds its lease). Everything it decides is in etcd (:mod:`vmdr.ha.store`), so a new leader
resumes where the old one stopped — also for the old leader's own host:

1. **detected** — a host this agent has seen as a member has no member key any more (its
   lease expired, or it stopped): ``ha/failovers/<host>`` is created (only if absent) with
   ``fence_until = now + fence_delay``. A host that comes back while its failover is
   still in flight (a VM waiting for room) and then fails again is detected again: the
   HA VMs it ran since join that record after a new fence delay (``failures`` lists
   both detections).
2. **fenced** — after the fence delay the host has destroyed its HA VMs itself (timing
   argument: :mod:`vmdr.ha.settings`); ``fence_command``, if set, runs now as a second
   layer, never waited for.
3. **placed** — :func:`~vmdr.ha.failover.failover_plan` on the live members (capacity from
   their libvirt), hosts in ``ha/maintenance/`` excluded; VMs that fit nowhere: gave-up.
4. **started** — by :func:`~vmdr.ha.boot.due`: a priority group (and a dependent VM) only
   after what it waits for is ready plus its delay. Before every start, libvirt on every
   reachable host is asked whether the VM runs already: then it is not started again. A
   start that fails is tried again after ``START_RETRY_S`` (``start_errors`` in the
   record); after ``START_ATTEMPTS`` on one host it is placed on the next eligible host
   (:mod:`vmdr.ha.replacing`), and only when none is left it gives up and its waiters
   go on. A host whose libvirt is down (its member key says so) is never a target.
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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from vmdr.ha.boot import Start, due
from vmdr.ha.failover import failover_plan
from vmdr.ha.fencing import FenceResult, run_fence_command
from vmdr.ha.model import ClusterState, HAPolicy, HostState, VMState
from vmdr.ha.noshared import (
    ORDER_CLAIM_S,
    RestorePoint,
    describe,
    lost_s,
    new_order,
    order_id,
    with_replica_affinity,
)
from vmdr.ha.replacing import (
    PLACE_RETRY_S,
    START_ATTEMPTS,
    START_RETRY_S,
    UNPLACED_GIVE_UP_S,
    Replacing,
    to_start,
)
from vmdr.ha.store import HAStore

__all__ = ["PLACE_RETRY_S", "START_ATTEMPTS", "START_RETRY_S", "UNPLACED_GIVE_UP_S",
           "FleetOps", "HALeader", "LiveHost", "domain_size"]

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
    libvirt_ok: bool = True  # False: alive (lease renewed) but its libvirt is down


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


@dataclass
class HALeader(Replacing):
    policy: HAPolicy
    store: HAStore
    ops: FleetOps
    me: str
    fence: Callable[[str, str], FenceResult] = run_fence_command
    _noted: set[str] = field(default_factory=set)  # gone hosts already reported
    _last_step: float | None = None
    _sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    _rechecked: dict[str, float] = field(default_factory=dict)  # see _fenced_since
    _replaced: dict[str, float] = field(default_factory=dict)  # see _place_again
    placement_s: list[float] = field(default_factory=list)  # the benchmark reads it
    # the wall clock (the agent's): a VM is ready when its check passed, not when the step
    # began — starts and checks before it in the same step can take seconds, and its
    # waiters' delay counts from the readiness itself. None (tests): the step's ``now``
    clock: Callable[[], float] | None = None

    # -- one poll -------------------------------------------------------------------------
    def step(self, now: float, live: dict[str, LiveHost], ever_seen: set[str]) -> None:
        if self._last_step is None or now - self._last_step > self.policy.settings.lease_ttl:
            # not leading for a while: a noted host may have rejoined and failed again
            # unseen, so what this agent noted before says nothing now
            self._noted.clear()
        self._last_step = now
        records = self.store.failovers()
        wheres: dict[str, str] = {}
        for host in sorted(set(records) & set(live)):
            if records[host].get("done"):  # back, and its failover finished: forget it
                self.store.delete_failover(host)
                del records[host]
            elif not records[host].get("back"):  # back while a VM still waits for room
                self._back(host, records[host], now)
        self._noted &= ever_seen - set(live)
        gone = sorted(ever_seen - set(live) - set(records) - self._noted)
        # back and gone again before its failover finished: a new failure of that host
        again = sorted(h for h in ever_seen - set(live) if h in records
                       and not records[h].get("done") and records[h].get("back"))
        if gone or again or any(not r.get("done") and r.get("plan") is None
                                for r in records.values()):
            wheres = self.store.wheres()  # one request, only when there is news
        for host in again:
            self._again(host, records[host], now, wheres)
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
                self._advance(host, rec, now, live, wheres, records)

    def _back(self, host: str, rec: dict[str, Any], now: float) -> None:
        """*host* has a live member key again while its failover is in flight (a VM still
        waits for room, or it fenced itself and reported it): noted in the record, so
        that its next disappearance is seen as a new failure (:meth:`_again`)."""
        rec["back"] = now
        self.store.put_failover(host, rec)
        log.info("%s is a member again while its failover is in flight", host)

    def _again(self, host: str, rec: dict[str, Any], now: float,
               wheres: dict[str, str]) -> None:
        """*host* failed again before the failover of its first failure finished: the HA
        VMs it ran since join the same record (placed like the VMs still waiting for
        room), after a new fence delay; the record stays one, so nothing it already
        started or is waiting for is lost."""
        plan = rec.get("plan")
        known = ({d["vm"] for d in plan["starts"]} | {u["vm"] for u in plan["unplaced"]}
                 if plan is not None else set())
        victims = sorted(vm for vm, h in wheres.items()
                         if h == host and vm in self.policy.vms and vm not in known)
        del rec["back"]
        rec["fence_until"] = now + self.policy.settings.fence_delay
        rec.setdefault("failures", [float(rec["detected"])]).append(now)
        if plan is not None:
            plan["unplaced"] += [{"vm": vm, "reason": f"ran on {host} when it failed again"}
                                 for vm in victims]
            rec["unplaced_final"] = False
            rec["refence"] = True
            self._replaced.pop(host, None)  # placed right after the new fence delay
        self.store.put_failover(host, rec)
        vms = f"its HA VMs ({', '.join(victims)}) restart" if victims else \
            "no other HA VM ran there; the VMs of its first failure go on"
        self.store.add_event(
            "detected", f"member lease of {host} expired again while the failover of its "
            f"first failure is in flight; {vms} after the fence delay "
            f"({self.policy.settings.fence_delay:g}s)", host=host, now=now,
            detail={"vms": victims, "fence_until": rec["fence_until"], "again": True})

    # -- one failover ---------------------------------------------------------------------
    def _others(self, host: str, records: dict[str, dict[str, Any]],
                wheres: dict[str, str]) -> tuple[list[Start], dict[str, float],
                                                 dict[str, float]]:
        """The starts of the other failovers in flight (hosts that failed together), with
        their started and released (ready or failed) times: priority groups and
        dependencies hold across them, as if it were one failure. A failover still in its
        fence delay contributes its victims as not started yet."""
        starts: list[Start] = []
        started: dict[str, float] = {}
        released: dict[str, float] = {}
        for h, r in records.items():
            if h == host:
                continue  # a finished one still counts: its VMs' ready times (+ delay)
            if r.get("plan") is None and not r.get("done"):
                for vm, w in wheres.items():
                    if w == h and vm in self.policy.vms:
                        rule = self.policy.vms[vm]
                        starts.append(Start(vm, "?", rule.priority, 0, (), rule.ready))
                continue
            if r.get("plan") is None:
                continue
            starts += [to_start(d) for d in r["plan"]["starts"]]
            started.update({k: float(v) for k, v in r.get("started", {}).items()})
            released.update({k: float(v) for k, v in r.get("ready", {}).items()})
            released.update({k: float(v) for k, v in r.get("failed", {}).items()})
        return starts, started, released

    def _advance(self, host: str, rec: dict[str, Any], now: float,
                 live: dict[str, LiveHost], wheres: dict[str, str],
                 records: dict[str, dict[str, Any]] | None = None) -> None:
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
                self.store.add_event("gave-up", f"{u['vm']} cannot be placed: {u['reason']}"
                                     f" (placed again as hosts join, for "
                                     f"{UNPLACED_GIVE_UP_S:g}s)", host=host, vm=u["vm"],
                                     now=now)
        else:
            if rec.pop("refence", False):  # it failed again (_again): fenced again
                self._fenced(host, rec, now)
                self.store.put_failover(host, rec)
            if rec["plan"]["unplaced"] and not rec.get("unplaced_final"):
                self._place_again(host, rec, now, live)
        starts = [to_start(d) for d in rec["plan"]["starts"]]
        by_vm = {st.vm: st for st in starts}
        started: dict[str, float] = {k: float(v) for k, v in rec["started"].items()}
        ready: dict[str, float] = {k: float(v) for k, v in rec["ready"].items()}
        released = dict(ready)
        released.update({k: float(v) for k, v in rec["failed"].items()})
        changed = False
        others, o_started, o_released = self._others(host, records or {}, wheres)
        # a VM of this failover that failed here (its new host died too) belongs to the
        # failover of that host now
        active = {vm for vm in by_vm if vm not in rec["failed"]}
        other_vms = {o.vm for o in others} - active
        if other_vms:  # wait across the failovers in flight too
            aug: list[Start] = []
            for st in starts:
                if st.vm not in active:
                    continue
                rule = self.policy.vms.get(st.vm)
                extra = {d for d in (rule.depends_on if rule else ()) if d in other_vms}
                extra |= {o.vm for o in others if o.vm in other_vms
                          and o.priority < st.priority}
                aug.append(replace(st, after=tuple(sorted(set(st.after) | extra))))
            seen: set[str] = set()
            for o in others:
                if o.vm in other_vms and o.vm not in seen:
                    seen.add(o.vm)
                    aug.append(o)
            # this failover's given-up VMs that no other failover has: released here
            mine = {st.vm for st in starts} - active - other_vms
            aug += [st for st in starts if st.vm in mine]
            merged_started = {k: v for k, v in o_started.items() if k not in active}
            merged_started.update({k: v for k, v in started.items()
                                   if k in active or k in mine})
            merged_released = {k: v for k, v in o_released.items() if k not in active}
            merged_released.update({k: v for k, v in released.items()
                                    if k in active or k in mine})
            due_now = [st for st in due(aug, now=now, started=merged_started,
                                        ready_at=merged_released) if st.vm in active]
        else:
            due_now = due(starts, now=now, started=started, ready_at=released)
        errs = rec.get("start_errors", {})
        for st in due_now:
            if st.vm in rec["failed"]:  # gave up (no XML, start failed): never again here
                continue
            if st.vm in errs and now < float(errs[st.vm]["at"]) + START_RETRY_S:
                continue
            changed = True
            self._start_one(host, rec, st, now, live)
        for vm in sorted(rec["started"]):
            if vm in rec["ready"] or vm in rec["failed"]:
                continue
            st = by_vm[vm]
            target = rec.get("hosts", {}).get(vm, st.host)
            restore = rec.get("restores", {}).get(vm)
            if restore is not None and not restore.get("running") and target in live:
                changed |= self._follow_restore(host, rec, vm, target, now)
                if vm not in rec["failed"] and not rec["restores"][vm].get("running") \
                        and now >= float(rec["started"][vm]) + st.ready.timeout:
                    changed |= self._restore_failed(rec, vm, target, now, "not started "
                                                    f"within {st.ready.timeout:g}s")
                if vm in rec["failed"] or not rec["restores"][vm].get("running"):
                    continue
            if target not in live and target != host:
                # its new host failed too: that host's failover has it
                rec["failed"][vm] = now
                changed = True
                self.store.add_event("gave-up", f"{vm}: its new host {target} is gone before "
                                     "it was ready; the failover of that host restarts it",
                                     host=target, vm=vm, now=now)
            elif target == host and self._fenced_since(host, rec, vm, now):
                changed = True  # it will start on its planned target (due again)
            elif self.ops.ready(target, vm, st.ready.check):
                t = max(now, self.clock()) if self.clock is not None else now
                rec["ready"][vm] = t
                changed = True
                t0 = float(rec["detected"])
                self.store.add_event("ready", f"{vm} is ready on {target} ({st.ready.check}"
                                     f"), {t - t0:.1f}s after detection", host=target, vm=vm,
                                     now=t, detail={"ready_s": round(t - t0, 2)})
                if target != host:  # a VM that never left its host was no failover
                    self.store.put_test(vm, kind="real", from_=host, to=target,
                                        start_s=round(float(rec["started"][vm]) - t0, 2),
                                        ready_s=round(t - t0, 2), now=t)
            elif now >= float(rec["started"][vm]) + st.ready.timeout:
                rec["failed"][vm] = now
                changed = True
                self.store.add_event("gave-up", f"{vm} not ready within "
                                     f"{st.ready.timeout:g}s; the VMs waiting for it go on",
                                     host=target, vm=vm, now=now)
        # a VM given up before it started (no XML, every start failed) is finished too:
        # else the record stays in flight and a new failure of the host is never seen
        if all(st.vm in rec["failed"] or (st.vm in rec["started"] and st.vm in rec["ready"])
               for st in starts) and (not rec["plan"]["unplaced"]
                                      or rec.get("unplaced_final")):
            rec["done"] = True
            changed = True
            log.info("failover of %s done after %.1fs", host, now - float(rec["detected"]))
        if changed:
            self.store.put_failover(host, rec)

    def _fenced_since(self, host: str, rec: dict[str, Any], vm: str, now: float) -> bool:
        """*vm* was found still running on the failed *host* itself (its libvirt answers:
        an etcd hiccup, a slow self-fence) and is not ready: once libvirt reports it
        nowhere (the host fenced it), it is no restart but a VM to start — forget that
        it was "started" there. Re-checked at most every ``START_RETRY_S``."""
        if now < self._rechecked.get(vm, -1e18) + START_RETRY_S:
            return False
        self._rechecked[vm] = now
        if self.ops.where_running(vm):
            return False
        del rec["started"][vm]
        rec.get("hosts", {}).pop(vm, None)
        self.store.add_event("detected", f"{vm} no longer runs on {host}, where it was "
                             "found running after the failure (fenced there) before it was"
                             " ready: it starts on its planned host", host=host, vm=vm,
                             now=now)
        return True

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

    def _plan(self, host: str, live: dict[str, LiveHost], wheres: dict[str, str],
              exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """The failover plan of *host* on the live hosts; a host whose libvirt is down
        (its agent says so in its member key) or in *exclude* is no target."""
        t0 = time.monotonic()
        maint = set(self.store.maintenance())
        hosts = {h.name: HostState(h.name, h.vcpus, h.memory_mib << 20,
                                   maintenance=h.name in maint,
                                   libvirt=h.libvirt_ok and h.name not in exclude)
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
        plan = failover_plan(with_replica_affinity(self.policy), ClusterState(hosts, vms),
                             {host}).to_json()
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

    def _start_one(self, host: str, rec: dict[str, Any], st: Start, now: float,
                   live: dict[str, LiveHost]) -> None:
        t0 = float(rec["detected"])
        rule = self.policy.vms.get(st.vm)
        if rule is not None and rule.local:
            order = self.store.restore_order(st.vm)
            if order is not None and order.get("id") == order_id(host, t0):
                self._adopt(host, rec, st, order, now)  # a former leader ordered it
                return
        running = self.ops.where_running(st.vm)
        if running:
            rec["started"][st.vm] = now
            rec.setdefault("hosts", {})[st.vm] = running[0]
            self.store.add_event("gave-up", f"{st.vm} not started: libvirt reports it "
                                 f"running on {', '.join(running)}", host=running[0],
                                 vm=st.vm, now=now, detail={"running_on": running})
            self.store.put_failover(host, rec)
            return
        if rule is not None and rule.local:
            order = new_order(rule, st.host, host, t0, now)
            self.store.put_restore_order(st.vm, order)
            self._adopt(host, rec, st, order, now)
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
            # not final at once: a transient error (a libvirt connection that died while
            # the hosts were cut off) must neither strand the VM nor release its waiters
            errs = rec.setdefault("start_errors", {})
            n = int(errs.get(st.vm, {}).get("n", 0)) + 1
            errs[st.vm] = {**errs.get(st.vm, {}), "n": n, "at": now,
                           "error": str(exc)[:200]}
            if n < START_ATTEMPTS:
                log.warning("start of %s on %s failed (attempt %d of %d, retry in %gs): %s",
                            st.vm, st.host, n, START_ATTEMPTS, START_RETRY_S, exc)
            else:
                self._move(host, rec, st, now, live, exc)  # or gave-up
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

    # -- VMs without shared storage (vmdr.ha.noshared) -------------------------------------
    def _adopt(self, host: str, rec: dict[str, Any], st: Start, order: dict[str, Any],
               now: float) -> None:
        """Record an order (written now or by a former leader) as this VM's start."""
        rec["started"].setdefault(st.vm, now)
        rec.setdefault("hosts", {})[st.vm] = order["host"]
        rec.setdefault("restores", {})[st.vm] = {"id": order["id"], "running": False,
                                                 "expires": order["expires"]}
        self.store.put_failover(host, rec)
        self.store.put_where(st.vm, order["host"], now)
        log.info("%s: restore ordered on %s (order %s)", st.vm, order["host"], order["id"])

    def _follow_restore(self, host: str, rec: dict[str, Any], vm: str, target: str,
                        now: float) -> bool:
        """One look at the order of *vm*: started (the `started` event with its restore
        point and the data lost), failed, or not claimed in time (given up, and the
        target never runs it)."""
        r = rec["restores"][vm]
        oid = str(r["id"])
        t0 = float(rec["detected"])
        status = self.store.restore_status(vm, oid) or {}
        state = status.get("state")
        if state == "started":
            point = RestorePoint.from_dict(status["point"])
            t = float(status.get("time", now))
            r.update(running=True, point=point.as_dict(), lost_s=lost_s(t0, point))
            rec["started"][vm] = t
            if any(e.kind == "started" and e.detail.get("order") == oid
                   for e in self.store.events(since=t0, vm=vm)):
                return True  # a former leader wrote it and died before its record
            self.store.add_event(
                "started", f"{vm} on {target} from {describe(point, t0)}, "
                f"{t - t0:.1f}s after detection", host=target, vm=vm, now=t,
                detail={"from": host, "start_s": round(t - t0, 2), "restore": point.kind,
                        "point": point.as_dict(), "lost_s": lost_s(t0, point),
                        "order": oid, "note": status.get("note") or None})
            return True
        if state == "failed":
            return self._restore_failed(rec, vm, target, now, str(status.get("reason")))
        claim = self.store.restore_claim(vm, oid)
        if claim is None and now >= float(r.get("expires", 0)):
            if self.store.claim_restore(vm, oid, {"by": self.me, "expired": True,
                                                  "time": now}):
                return self._restore_failed(
                    rec, vm, target, now, f"{target}'s agent did not take the restore "
                    f"order within {ORDER_CLAIM_S:g}s (it never runs it now)")
            claim = self.store.restore_claim(vm, oid)
        if claim is not None and claim.get("expired"):
            return self._restore_failed(rec, vm, target, now, "the restore order expired "
                                        "before its host took it")
        return False

    def _restore_failed(self, rec: dict[str, Any], vm: str, target: str, now: float,
                        reason: str) -> bool:
        rec["failed"][vm] = now
        self.store.add_event("gave-up", f"{vm}: not restored on {target}: {reason}",
                             host=target, vm=vm, now=now, detail={"reason": reason})
        return True
