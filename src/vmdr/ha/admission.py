"""Admission control: can the cluster still restart every HA VM after any
``host_failures_tolerated`` hosts fail?

Pure. Every combination of that many hosts (among those up and out of maintenance) is
failed in turn and its HA VMs placed on the rest (:func:`vmdr.ha.placement.place`, so
anti-affinity and host affinity count, not just raw capacity — vSphere's "slot" policy
ignores both). Above ``MAX_SCENARIOS`` combinations only the heaviest ones are tried
(the hosts with the most HA memory), and the result says it is not exhaustive.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from math import comb

from vmdr.ha.model import HAVM, ClusterState, HAPolicy, VMState
from vmdr.ha.placement import free_capacity, place

__all__ = ["MAX_SCENARIOS", "Admission", "admit", "check"]

MAX_SCENARIOS = 5000


@dataclass
class Scenario:
    failed: tuple[str, ...]
    unplaced: dict[str, str]
    spare_memory: int  # free memory left on the survivors after the restarts


@dataclass
class Admission:
    required: int
    ok: bool
    scenarios: int
    exhaustive: bool
    failing: list[Scenario] = field(default_factory=list)
    worst: Scenario | None = None  # least spare memory among the passing scenarios

    def problems(self) -> list[str]:
        out = []
        for sc in self.failing[:10]:
            vms = "; ".join(f"{vm}: {why}" for vm, why in sorted(sc.unplaced.items()))
            verb = "fails" if len(sc.failed) == 1 else "fail"
            out.append(f"if {', '.join(sc.failed)} {verb}: {vms}")
        if len(self.failing) > 10:
            out.append(f"... and {len(self.failing) - 10} more failure scenarios")
        return out


def _scenarios(policy: HAPolicy, state: ClusterState, k: int) -> tuple[list[tuple[str, ...]],
                                                                      bool]:
    hosts = sorted(h.name for h in state.hosts.values() if h.up and not h.maintenance)
    k = min(k, len(hosts))
    if k == 0:
        return [()], True
    if comb(len(hosts), k) <= MAX_SCENARIOS:
        return list(itertools.combinations(hosts, k)), True
    load = {h: 0 for h in hosts}
    for v in state.vms.values():
        if v.running and v.host in load and v.name in policy.vms:
            load[v.host] += v.memory
    heavy = sorted(hosts, key=lambda h: (-load[h], h))
    n = k
    while n < len(heavy) and comb(n + 1, k) <= MAX_SCENARIOS:
        n += 1
    return list(itertools.combinations(sorted(heavy[:n]), k)), False


def check(policy: HAPolicy, state: ClusterState, k: int | None = None) -> Admission:
    """Does every HA VM survive any ``k`` (default: host_failures_tolerated) host
    failures?"""
    k = policy.settings.host_failures_tolerated if k is None else k
    combos, exhaustive = _scenarios(policy, state, k)
    adm = Admission(k, True, len(combos), exhaustive)
    for failed in combos:
        after = state.fail(set(failed))
        victims = [v.name for v in state.vms.values()
                   if v.name in policy.vms and v.running and v.host in failed]
        p = place(policy, after, victims)
        spare = sum(max(f.memory, 0) for f in free_capacity(policy, after).values()) - sum(
            state.vms[vm].memory for vm in p.placed)
        sc = Scenario(failed, p.unplaced, spare)
        if p.unplaced:
            adm.ok = False
            adm.failing.append(sc)
        elif adm.worst is None or spare < adm.worst.spare_memory:
            adm.worst = sc
    return adm


def admit(policy: HAPolicy, state: ClusterState, rule: HAVM, vm: VMState) -> Admission:
    """Admission control for putting ``vm`` (with its HA ``rule``) under HA: the check as
    if it were already."""
    policy2 = replace(policy, vms={**policy.vms, rule.name: rule})
    state2 = replace(state, vms={**state.vms, vm.name: vm})
    return check(policy2, state2)


def per_vm(policy: HAPolicy, state: ClusterState) -> tuple[Admission, dict[str, str]]:
    """Admission of each HA VM: the check of all of them, and the VMs that break it (VM ->
    why). VMs are admitted one at a time by restart priority (boot_group, then name): the
    first whose addition makes the check fail is refused, and the ones after it are judged
    without it (``admission = "refuse"``: the cluster keeps the VMs it can protect)."""
    whole = check(policy, state)
    if whole.ok:
        return whole, {}
    refused: dict[str, str] = {}
    base = replace(policy, vms={})
    for name in sorted(policy.vms, key=lambda n: (policy.vms[n].priority, n)):
        vm = state.vms.get(name) or VMState(name, None, running=False)
        a = admit(base, state, policy.vms[name], vm)
        if a.ok:
            base = replace(base, vms={**base.vms, name: policy.vms[name]})
        else:
            refused[name] = "; ".join(a.problems()[:3])
    return whole, refused


def enforce(policy: HAPolicy, state: ClusterState) -> tuple[HAPolicy, dict[str, str]]:
    """Admission control at config load (the agent): the VMs that break
    ``host_failures_tolerated`` (VM -> why), and the policy to run with — without them when
    ``admission = "refuse"``, unchanged (the caller warns) when ``"warn"``."""
    _whole, refused = per_vm(policy, state)
    if refused and policy.settings.admission == "refuse":
        policy = replace(policy, vms={n: r for n, r in policy.vms.items() if n not in refused})
    return policy, refused
