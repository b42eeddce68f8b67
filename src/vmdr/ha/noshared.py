"""HA without shared storage: a VM whose disks live only on its failed host restarts on a
survivor from its newest restore point, and the event states the data that lost.

A VM is declared so in the inventory (``[vm.NAME] ha_storage = "local"``; the default
``"shared"`` restarts from the stored domain XML as before). Placement (capacity,
anti-affinity, affinity, priority groups, readiness) is the same as for every HA VM.

A VM with a replica on an inventory host (``replica_to = "<host>"``) prefers that host
(:func:`with_replica_affinity`, a ``should`` rule unless the VM has host rules of its own).

Where it starts, the restore point is, in this order (:func:`choose`):

1. the newest restore point of its **replica**, when the VM was placed on the host that
   holds the replica (vmdr.agent.ha_replica: the way ``vmdr failover`` brings one VM up);
2. the newest **backup snapshot** of it in its repository (``ha_repository``, a
   ``[repositories.NAME]``; by default the only one declared), through instant restore:
   the VM boots at once from an NBD export of the snapshot while its disks are copied to
   the host's storage.

No restore point: ``gave-up`` with the reason. The data lost is the failure's detection
time minus the restore point's time (:func:`lost_s`), an upper bound: the VM wrote nothing
after its host died, which was before the leader noticed.

The leader never runs the restore itself: the NBD server must live on the target host. It
writes an **order** (``ha/restores/<vm>``, :func:`new_order`) that the target's agent
carries out (vmdr.agent.ha_restore). Exactly one side *claims* an order, by a
create-if-absent key: the target (it runs it) or, once :data:`ORDER_CLAIM_S` passed
unclaimed, the leader (it gives the VM up; the target never runs it after that). The
target reports ``running`` (with the restore point), then ``started`` or ``failed``. A new
leader finds the order by its id (failed host + detection time) and never writes a second
one for the same failover, so a VM is never restored twice; fencing is unchanged (the
order is written only after the fence delay, like any start).

Pure functions of their arguments.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from vmdr.ha.model import HAVM, HAPolicy

__all__ = [
    "ORDER_CLAIM_S",
    "RestorePoint",
    "choose",
    "describe",
    "fmt_span",
    "lost_s",
    "new_order",
    "newest",
    "order_id",
    "with_replica_affinity",
]

ORDER_CLAIM_S = 20.0  # s the target's agent has to claim an order (it polls every 0.25 s)
KINDS = ("replica", "snapshot")


@dataclass(frozen=True)
class RestorePoint:
    kind: str  # replica | snapshot
    id: str  # the replica point's name, or the snapshot's ID
    time: float  # epoch s: when the point was taken
    where: str  # the replica's host, or the repository's name

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "time": self.time, "where": self.where}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RestorePoint:
        return cls(str(d["kind"]), str(d["id"]), float(d["time"]), str(d.get("where", "")))

    @property
    def label(self) -> str:
        return (f"replica point {self.id} on {self.where}" if self.kind == "replica"
                else f"snapshot {self.id[:8]}")


def newest(points: Iterable[RestorePoint]) -> RestorePoint | None:
    best: RestorePoint | None = None
    for p in points:
        if best is None or p.time > best.time:
            best = p
    return best


def lost_s(failure_t: float, point: RestorePoint) -> float:
    """Seconds of writes lost at most: from the restore point to the failure."""
    return round(max(0.0, failure_t - point.time), 1)


def fmt_span(s: float) -> str:
    """4 min 12 s, 2 h 3 min, 3 d 4 h, 12 s."""
    n = round(s)
    if n < 60:
        return f"{n} s"
    if n < 3600:
        return f"{n // 60} min {n % 60} s"
    if n < 86400:
        return f"{n // 3600} h {n % 3600 // 60} min"
    return f"{n // 86400} d {n % 86400 // 3600} h"


def _clock(t: float, ref: float) -> str:
    """HH:MM:SS (UTC), with the date when it is not *ref*'s day."""
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    same = d.date() == dt.datetime.fromtimestamp(ref, dt.UTC).date()
    return d.strftime("%H:%M:%S" if same else "%Y-%m-%d %H:%M:%S")


def describe(point: RestorePoint, failure_t: float) -> str:
    """``snapshot 3f2a1b2c of 07:41:10 (instant restore; lost ≤ 4 min 12 s of writes)``"""
    how = "replica standby" if point.kind == "replica" else "instant restore"
    return (f"{point.label} of {_clock(point.time, failure_t)} ({how}; lost ≤ "
            f"{fmt_span(lost_s(failure_t, point))} of writes)")


def choose(rule: HAVM, target: str, replica: RestorePoint | None,
           snapshot: RestorePoint | None) -> tuple[RestorePoint | None, str]:
    """The restore point a VM placed on *target* starts from, or (None, why not).
    *replica*: the newest point of its replica (None: none or unreadable); *snapshot*:
    the newest backup snapshot in its repository (None: none)."""
    if replica is not None and rule.replica_host == target:
        return replica, ""
    if snapshot is not None:
        return snapshot, ""
    why = []
    if rule.replica_host is None:
        why.append("no replica declared")
    elif rule.replica_host != target:
        why.append(f"its replica is on {rule.replica_host}, not {target}")
    else:
        why.append(f"its replica on {target} has no restore point")
    why.append(f"no backup of it in repository {rule.repository}" if rule.repository
               else "no repository to restore it from (ha_repository)")
    return None, "no restore point: " + "; ".join(why)


def with_replica_affinity(policy: HAPolicy) -> HAPolicy:
    """The policy with a ``should`` preference for the replica's host of every local VM
    that has a replica and no host rules of its own (the leader, ``simulate`` and
    ``status`` place with it)."""
    vms = {n: (replace(r, affinity_hosts=(r.replica_host,), hosts_rule="should")
               if r.local and r.replica_host and not r.affinity_hosts else r)
           for n, r in policy.vms.items()}
    return replace(policy, vms=vms)


def order_id(failed_host: str, detected: float) -> str:
    """One ID per failover of a host: a new leader finds the order of the old one."""
    return f"{failed_host}-{int(detected * 1000)}"


def new_order(rule: HAVM, target: str, failed_host: str, detected: float,
              now: float) -> dict[str, Any]:
    return {"id": order_id(failed_host, detected), "vm": rule.name, "host": target,
            "from": failed_host, "detected": detected, "ordered": now,
            "expires": now + ORDER_CLAIM_S, "repository": rule.repository,
            "replica": rule.replica_host == target}
