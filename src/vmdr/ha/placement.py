"""Placement: where each VM to restart goes, or why it cannot go anywhere.

Pure. Candidates are the hosts that are up, not in maintenance, of known capacity and whose
libvirt answers (a host whose libvirtd died is alive — its VMs run on — but a start there
would fail).
A host offers ``vcpus × cpu_overcommit`` and its memory, minus what its running VMs use
(memory is never overcommitted). A VM may not join a host (or, for a rack-scoped group,
a rack) that already runs a member of its anti-affinity group, nor leave its ``must``
hosts. Among the hosts left, ``should`` hosts come first, then the host with the most
free memory (spreading the load, as vSphere HA and Proxmox's ``static`` scheduler do),
then the name, so the result is deterministic.

VMs are placed by priority group (boot_group), dependencies first, then largest memory
first: when capacity runs short, it is the lowest-priority VMs that are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmdr.ha.model import ClusterState, HAPolicy
from vmdr.plan.units import fmt_size

__all__ = ["Placement", "place"]


@dataclass
class Placement:
    placed: dict[str, str] = field(default_factory=dict)  # vm -> host
    unplaced: dict[str, str] = field(default_factory=dict)  # vm -> why
    notes: list[str] = field(default_factory=list)


@dataclass
class _Free:
    host: str
    vcpus: float
    memory: int


def free_capacity(policy: HAPolicy, state: ClusterState) -> dict[str, _Free]:
    """Free capacity of every candidate host after the VMs running on it."""
    free: dict[str, _Free] = {}
    for h in state.hosts.values():
        if h.eligible and h.vcpus is not None and h.memory is not None:
            free[h.name] = _Free(h.name, h.vcpus * policy.cpu_overcommit, h.memory)
    for v in state.vms.values():
        if v.running and v.host in free:
            free[v.host].vcpus -= v.vcpus
            free[v.host].memory -= v.memory
    return free


def _order(policy: HAPolicy, state: ClusterState, vms: list[str]) -> list[str]:
    pool = set(vms)
    depth: dict[str, int] = {}

    def d(name: str) -> int:
        if name not in depth:
            depth[name] = 0  # cycles are refused by the inventory; guard anyway
            deps = [x for x in policy.vms[name].depends_on if x in pool]
            depth[name] = 1 + max((d(x) for x in deps), default=-1)
        return depth[name]

    return sorted(pool, key=lambda n: (policy.vms[n].priority, d(n),
                                       -state.vms[n].memory if n in state.vms else 0, n))


def place(policy: HAPolicy, state: ClusterState, vms: list[str]) -> Placement:
    """Place the HA VMs ``vms`` (not running now) on the candidate hosts of ``state``."""
    result = Placement()
    free = free_capacity(policy, state)
    occupied: dict[str, set[str]] = {}  # group -> units running a member
    for v in state.vms.values():
        group = policy.groups.get(v.name)
        if group and v.running and v.host is not None:
            occupied.setdefault(group, set()).add(policy.unit(group, v.host))
    for name in _order(policy, state, vms):
        rule = policy.vms[name]
        need = state.vms[name]
        if not need.size_known:
            result.notes.append(f"{name}: size unknown (set vm.{name}.vcpus and memory); "
                                "placed without counting it")
        group = policy.groups.get(name)
        taken = occupied.get(group, set()) if group else set()
        rejects: dict[str, list[str]] = {}
        fits: list[_Free] = []
        hosts = rule.affinity_hosts if rule.hosts_rule == "must" and rule.affinity_hosts \
            else tuple(free)
        for h in hosts:
            f = free.get(h)
            if f is None:
                rejects.setdefault("unavailable", []).append(h)
            elif group and policy.unit(group, h) in taken:
                rejects.setdefault("anti", []).append(h)
            elif need.memory > f.memory:
                rejects.setdefault("memory", []).append(h)
            elif need.vcpus > f.vcpus:
                rejects.setdefault("vcpus", []).append(h)
            else:
                fits.append(f)
        if not fits:
            result.unplaced[name] = _why(policy, name, need.memory, need.vcpus, rejects,
                                         free, group)
            lv = sorted(h.name for h in state.hosts.values() if h.up and not h.libvirt)
            if lv:
                result.unplaced[name] += f" ({', '.join(lv)}: libvirt down, no target)"
            continue
        preferred = set(rule.affinity_hosts) if rule.hosts_rule == "should" else set()
        best = min(fits, key=lambda f: (f.host not in preferred, -f.memory, f.host))
        if preferred and best.host not in preferred:
            result.notes.append(f"{name}: none of its preferred hosts "
                                f"({', '.join(rule.affinity_hosts)}) fits; placed on "
                                f"{best.host}")
        best.memory -= need.memory
        best.vcpus -= need.vcpus
        result.placed[name] = best.host
        if group:
            occupied.setdefault(group, set()).add(policy.unit(group, best.host))
    return result


def _why(policy: HAPolicy, name: str, memory: int, vcpus: int,
         rejects: dict[str, list[str]], free: dict[str, _Free], group: str | None) -> str:
    rule = policy.vms[name]
    if not rejects:
        return "no host is up, out of maintenance and of known capacity"
    parts = []
    if "unavailable" in rejects:
        hs = ", ".join(sorted(rejects["unavailable"]))
        if rule.hosts_rule == "must" and rule.affinity_hosts:
            parts.append(f"must run on {hs} (vm.{name}.hosts), which are down, in "
                         "maintenance or of unknown capacity")
        else:
            parts.append(f"{hs} unavailable")
    if "anti" in rejects and group:
        scope = policy.settings.scope(group)
        parts.append(f"anti-affinity group {group!r}: {', '.join(sorted(rejects['anti']))} "
                     f"already {'have' if len(rejects['anti']) > 1 else 'has'} a member "
                     f"on {'its' if len(rejects['anti']) == 1 else 'their'} {scope}")
    if "memory" in rejects:
        most = max((free[h] for h in rejects["memory"]), key=lambda f: (f.memory, f.host))
        parts.append(f"needs {fmt_size(memory)} memory, at most {fmt_size(max(most.memory, 0))}"
                     f" free ({most.host})")
    if "vcpus" in rejects:
        most = max((free[h] for h in rejects["vcpus"]), key=lambda f: (f.vcpus, f.host))
        parts.append(f"needs {vcpus} vCPUs, at most {max(most.vcpus, 0):g} free "
                     f"({most.host}, cpu_overcommit {policy.cpu_overcommit:g})")
    return "; ".join(parts)
