"""The leader placing VMs again (mixed into :class:`vmdr.ha.leader.HALeader`):

* a VM that fitted nowhere when its host failed is placed again every ``PLACE_RETRY_S``
  while hosts rejoin (after an etcd outage every member key comes back one by one), and
  given up only after ``UNPLACED_GIVE_UP_S``;
* a VM whose start failed ``START_ATTEMPTS`` times on its target (its libvirt refuses;
  ``start_errors`` in the record) is placed on the next eligible host it was not tried
  on, and given up only when there is none. A start that got no answer at all is never
  moved: it may have started there, and a second copy elsewhere would be a double run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vmdr.ha.boot import Start
from vmdr.ha.model import HAPolicy, Readiness
from vmdr.ha.store import HAStore

if TYPE_CHECKING:
    from vmdr.ha.leader import LiveHost

__all__ = ["PLACE_RETRY_S", "START_ATTEMPTS", "START_RETRY_S", "UNPLACED_GIVE_UP_S",
           "Replacing", "to_start"]

log = logging.getLogger("vmdr.ha")
START_ATTEMPTS = 3  # a start that fails this often on one host moves to the next host
START_RETRY_S = 1.0  # s between attempts; each one re-checks libvirt on every host first
PLACE_RETRY_S = 2.0
UNPLACED_GIVE_UP_S = 300.0


def to_start(d: dict[str, Any]) -> Start:
    """A start of a stored plan (``FailoverPlan.to_json``)."""
    r = d.get("ready") or {}
    return Start(d["vm"], d["host"], int(d["priority"]), int(d["stage"]),
                 tuple(d.get("after") or ()),
                 Readiness(r.get("check", "agent"), float(r.get("delay_s", 0.0)),
                           float(r.get("timeout_s", 300.0))),
                 tuple(d.get("missing_dependencies") or ()))


class Replacing:
    """The placing-again part of the leader (its fields are the leader's)."""

    policy: HAPolicy
    store: HAStore
    _replaced: dict[str, float]

    def _plan(self, host: str, live: dict[str, LiveHost], wheres: dict[str, str],
              exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        raise NotImplementedError  # HALeader's

    def _place_again(self, host: str, rec: dict[str, Any], now: float,
                     live: dict[str, LiveHost]) -> None:
        """Place the VMs that fitted nowhere again (a host may have rejoined); the ones
        placed now join the plan, waiting for the plan's earlier priority groups and
        their dependencies like the others. After ``UNPLACED_GIVE_UP_S``: given up."""
        if now < self._replaced.get(host, -1e18) + PLACE_RETRY_S:
            return
        self._replaced[host] = now
        plan = rec["plan"]
        if now >= float(rec["fence_until"]) + UNPLACED_GIVE_UP_S:
            rec["unplaced_final"] = True
            for u in plan["unplaced"]:
                self.store.add_event("gave-up", f"{u['vm']} still cannot be placed after "
                                     f"{UNPLACED_GIVE_UP_S:g}s: {u['reason']}", host=host,
                                     vm=u["vm"], now=now)
            self.store.put_failover(host, rec)
            return
        waiting = {u["vm"] for u in plan["unplaced"]}
        new = self._plan(host, live, {vm: host for vm in waiting}
                         | {vm: h for vm, h in self.store.wheres().items()
                            if vm not in waiting})
        placed = [d for d in new["starts"] if d["vm"] in waiting]
        if not placed:
            plan["unplaced"] = [u for u in new["unplaced"] if u["vm"] in waiting] \
                or plan["unplaced"]
            return
        old = [to_start(d) for d in plan["starts"]]
        for d in placed:
            rule = self.policy.vms[d["vm"]]
            d["after"] = sorted(set(d["after"]) | {o.vm for o in old if o.priority
                                                   < rule.priority or o.vm in
                                                   rule.depends_on})
            plan["starts"].append(d)
            self.store.add_event("placed", f"{d['vm']} goes to {d['host']} (priority group "
                                 f"{d['priority']}, placed again after a host joined)",
                                 host=d["host"], vm=d["vm"], now=now,
                                 detail={"from": host, "after": d["after"]})
        done = {d["vm"] for d in placed}
        plan["unplaced"] = [u for u in plan["unplaced"] if u["vm"] not in done]
        self.store.put_failover(host, rec)


    def _move(self, host: str, rec: dict[str, Any], st: Start, now: float,
              live: dict[str, LiveHost], exc: BaseException) -> bool:
        """*st* failed ``START_ATTEMPTS`` times on ``st.host``: place it on another
        eligible host (none it was tried on; room counted for the plan's other VMs not
        started yet). False, and the VM given up, when there is none."""
        errs = rec.setdefault("start_errors", {})
        e = errs.get(st.vm, {})
        n = int(e.get("n", START_ATTEMPTS))
        tried = sorted(set(e.get("tried") or ()) | {st.host})
        why = f"start on {st.host} failed {n} times: {str(exc)[:200]}"
        to = None
        if isinstance(exc, TimeoutError):
            why += " (no answer: it may run there, so it is not started elsewhere)"
        else:
            wheres = {vm: h for vm, h in self.store.wheres().items()
                      if h != host and vm != st.vm}
            for d in rec["plan"]["starts"]:  # their room is taken already
                if d["vm"] not in rec["started"] and d["vm"] not in rec["failed"]:
                    wheres[d["vm"]] = d["host"]
            wheres[st.vm] = host
            new = self._plan(host, live, wheres, exclude=set(tried))
            to = next((d["host"] for d in new["starts"] if d["vm"] == st.vm), None)
            if to is None:
                u = next((u["reason"] for u in new["unplaced"] if u["vm"] == st.vm),
                         "no other host")
                why += f"; no other host fits ({u})"
        if to is None:
            rec["failed"][st.vm] = now
            self.store.add_event("gave-up", f"{st.vm}: {why}", host=st.host, vm=st.vm,
                                 now=now, detail={"tried": tried})
            return False
        for d in rec["plan"]["starts"]:
            if d["vm"] == st.vm:
                d["host"] = to
        errs[st.vm] = {"n": 0, "at": now, "error": str(exc)[:200], "tried": tried}
        log.warning("%s: %s; placed on %s", st.vm, why, to)
        self.store.add_event("placed", f"{st.vm} goes to {to}: {why}", host=to, vm=st.vm,
                             now=now, detail={"from": host, "tried": tried})
        return True
