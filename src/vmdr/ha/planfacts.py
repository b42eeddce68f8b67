"""The HA facts the DR plan needs (:class:`vmdr.plan.hafacts.HAFacts`), read from the
fleet's etcd when it answers, else from the inventory (saying so).

* admission control per HA VM (:func:`vmdr.ha.admission.per_vm`) on the live cluster:
  the agents' members (capacity, running VMs) and the hosts in maintenance;
* the last passed failover of each HA VM (``ha/tests/<vm>``);
* N+1 on the live cluster: for each host with running VMs, do they all fit on the hosts
  that are up and out of maintenance (placement rules included)?
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from vmdr.errors import ConfigError
from vmdr.plan.capacity import HostFailure
from vmdr.plan.hafacts import HAFacts, HAVMFacts
from vmdr.plan.inventory import Inventory

from . import admission
from .fleet import all_rules, state_from_members
from .model import ClusterState, HAPolicy, load_policy, state_from_inventory
from .placement import place
from .records import HARecords

__all__ = ["plan_facts"]


def live_n1(inv: Inventory, policy: HAPolicy, state: ClusterState) -> list[HostFailure]:
    out = []
    for h in sorted(state.hosts):
        vms = sorted(v.name for v in state.vms.values() if v.running and v.host == h)
        if not vms:
            continue
        after = state.fail({h})
        p = place(all_rules(inv, policy, vms), after, vms)
        unknown = [v for v in vms if not state.vms[v].size_known]
        if p.unplaced:
            why = "; ".join(f"{vm}: {r}" for vm, r in sorted(p.unplaced.items()))
            out.append(HostFailure(h, vms, False, p.placed,
                                   f"if {h} fails, {', '.join(sorted(p.unplaced))} cannot "
                                   f"be placed ({why}); add capacity or a host"))
        elif unknown:
            out.append(HostFailure(h, vms, None, p.placed,
                                   f"size of {', '.join(unknown)} unknown: set "
                                   "vm.NAME.vcpus and memory"))
        else:
            out.append(HostFailure(h, vms, True, p.placed))
    return out


def plan_facts(inv: Inventory, open_records: Callable[[], HARecords | None], *,
               why_none: str = "no [agent] etcd configured") -> HAFacts:
    """The facts; ``open_records`` gives the etcd records (None: not read, ``why_none``;
    an exception: etcd unreachable)."""
    try:
        policy = load_policy(inv)
    except ConfigError as exc:
        return HAFacts("inventory", False, note=f"the HA policy is invalid: {exc.message}")
    records: HARecords | None = None
    note: str | None = None
    try:
        records = open_records()
        if records is None:
            note = why_none
    except Exception as exc:  # any etcd failure: the plan falls back
        note = f"etcd not reachable: {exc}"
    state: ClusterState | None = None
    tests = {}
    source = "inventory"
    if records is not None:
        try:
            state, notes = state_from_members(inv, records)
            tests = records.tests()
            up = sum(1 for h in state.hosts.values() if h.up)
            source = f"etcd ({up} live agent{'s' if up != 1 else ''})"
            note = "; ".join(notes) or None
            if up == 0:
                state, records = None, None
                note, source = "etcd answers but no agent is live", "inventory"
        except Exception as exc:
            state, records, note = None, None, f"etcd not reachable: {exc}"
    live = state is not None
    if state is None:
        state = state_from_inventory(inv)
    _whole, refused = admission.per_vm(policy, state)
    vms = {}
    for name in policy.vms:
        t = tests.get(name)
        vms[name] = HAVMFacts(
            admitted=name not in refused, admission=refused.get(name),
            last_test=datetime.fromtimestamp(t.time, UTC) if t else None,
            test_kind=t.kind if t else None, test_to=t.target if t else None,
            ready_s=t.ready_s if t else None)
    facts = HAFacts(source, records is not None, vms, policy.settings.worst_restart_after_crash,
                    note=note)
    if live:
        facts.n1 = live_n1(inv, policy, state)
        facts.n1_source = f"live data: {source}"
    else:
        facts.n1_source = f"inventory figures ({note})" if note else "inventory figures"
    return facts
