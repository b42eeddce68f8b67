"""What the plan knows of high availability, as plain data handed in by the caller
(``vmdr.ha.planfacts`` reads it from the fleet's etcd; the plan imports no HA code).

The host-level rule: a VM counts as covered by HA only when

1. HA is enabled for it (``ha = true`` on it or its tier);
2. admission control holds for it (the cluster can still restart every HA VM after any
   ``host_failures_tolerated`` host failures);
3. a failover of it passed within the plan's ``test_interval``: a ``vmdr ha test`` or a
   real failover that reached ready (``ha/tests/<vm>`` in etcd).

Without etcd the third condition cannot be shown: HA is then "not proven".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from vmdr.plan.capacity import HostFailure
from vmdr.plan.units import fmt_duration

__all__ = ["HAFacts", "HAVMFacts", "ha_verdict"]


@dataclass(frozen=True)
class HAVMFacts:
    admitted: bool | None = None  # None: unknown
    admission: str | None = None  # why not admitted
    last_test: datetime | None = None
    test_kind: str | None = None  # test | real
    test_to: str | None = None
    ready_s: float | None = None


@dataclass
class HAFacts:
    source: str  # where the facts come from, e.g. "etcd (3 live agents)" or "inventory"
    records: bool  # failover tests could be read (etcd reachable)
    vms: dict[str, HAVMFacts] = field(default_factory=dict)  # HA-enabled VMs only
    restart_s: float | None = None  # worst case from a host crash to the restart decision
    n1: list[HostFailure] | None = None  # N+1 from live data (None: the plan computes it)
    n1_source: str = "inventory figures"
    note: str | None = None  # why the facts are limited (etcd unreachable...)


def ha_verdict(facts: HAFacts | None, vm: str, enabled: bool, now: datetime,
               test_interval_s: float) -> tuple[bool, str | None]:
    """(covered by HA, the first condition that fails or None). ``(False, None)`` for a VM
    without HA."""
    if not enabled:
        return False, None
    if facts is None:
        return False, "HA not proven: the HA state was not read"
    f = facts.vms.get(vm, HAVMFacts())
    if f.admitted is False:
        return False, f"admission control fails for {vm}: {f.admission}"
    if not facts.records:
        why = facts.note or "no etcd"
        return False, (f"HA not proven: no failover test can be read ({why}); run "
                       f"`vmdr ha test {vm}` with [agent] etcd set")
    if f.last_test is None:
        return False, (f"HA not proven: no passed failover test of {vm} on record: run "
                       f"`vmdr ha test {vm}`")
    age = (now - f.last_test).total_seconds()
    if age > test_interval_s:
        return False, (f"HA not proven: the last passed failover of {vm} ({f.test_kind}) is "
                       f"{fmt_duration(age)} old (test_interval {fmt_duration(test_interval_s)})"
                       f": run `vmdr ha test {vm}`")
    if f.admitted is None:
        return False, f"HA not proven: admission control for {vm} unknown"
    return True, None
