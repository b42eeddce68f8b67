"""Host capacity: the N+1 check and placing VMs on surviving hosts.

Pure functions. A VM needs its memory and vCPUs on the target; a host offers its declared
memory and ``vcpus × cpu_overcommit``. Placement is first-fit decreasing by memory, onto the
host with the most free memory first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmdr.plan.inventory import Inventory


@dataclass(frozen=True)
class Need:
    vm: str
    vcpus: int | None
    memory: int | None  # bytes


@dataclass
class Free:
    host: str
    vcpus: float
    memory: int


@dataclass
class HostFailure:
    """What happens to a host's VMs if that host fails."""

    host: str
    vms: list[str]
    fits: bool | None  # None: unknown (capacity or sizes missing)
    placement: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


def free_capacity(inv: Inventory, needs: dict[str, Need],
                  hosts: list[str]) -> tuple[dict[str, Free], list[str]]:
    """Free capacity on *hosts* after their own VMs; and the hosts of unknown capacity."""
    unknown = []
    free: dict[str, Free] = {}
    for h in hosts:
        host = inv.hosts[h]
        if host.memory is None or host.vcpus is None:
            unknown.append(h)
            continue
        f = Free(h, host.vcpus * inv.settings.cpu_overcommit, host.memory)
        for vm in inv.vms.values():
            n = needs.get(vm.name)
            if vm.host == h and n is not None:
                f.vcpus -= n.vcpus or 0
                f.memory -= n.memory or 0
        free[h] = f
    return free, unknown


def place(needs: list[Need], free: dict[str, Free]) -> tuple[dict[str, str], list[str]]:
    """Place *needs* on *free* (which is updated); return placement and the VMs that do not
    fit. A need with unknown size is placed on the emptiest host without being counted."""
    placement: dict[str, str] = {}
    left: list[str] = []
    for n in sorted(needs, key=lambda n: (-(n.memory or 0), n.vm)):
        for f in sorted(free.values(), key=lambda f: (-f.memory, f.host)):
            if (n.memory or 0) <= f.memory and (n.vcpus or 0) <= f.vcpus:
                f.memory -= n.memory or 0
                f.vcpus -= n.vcpus or 0
                placement[n.vm] = f.host
                break
        else:
            left.append(n.vm)
    return placement, left


def n_plus_one(inv: Inventory, needs: dict[str, Need]) -> list[HostFailure]:
    """For every host with VMs: do they fit on the other hosts if it fails?"""
    out = []
    for h in sorted(inv.hosts):
        vms = sorted(v.name for v in inv.vms.values() if v.host == h)
        if not vms:
            continue
        others = [o for o in sorted(inv.hosts) if o != h]
        if not others:
            out.append(HostFailure(h, vms, False, problem=(
                f"{h} is the only host: if it fails, {', '.join(vms)} have nowhere to run; "
                "add a host (N+1)")))
            continue
        free, unknown = free_capacity(inv, needs, others)
        sizes_unknown = [v for v in vms if needs[v].memory is None or needs[v].vcpus is None]
        placement, left = place([needs[v] for v in vms], free)
        if left:
            short = ", ".join(left)
            hint = f" (capacity of {', '.join(unknown)} unknown: set hosts.NAME.vcpus and " \
                   "memory)" if unknown else ""
            out.append(HostFailure(h, vms, None if unknown else False, placement,
                                   f"if {h} fails, {short} do not fit on the other hosts by "
                                   f"memory and vCPU{hint}; add capacity or a host"))
        elif sizes_unknown:
            out.append(HostFailure(h, vms, None, placement,
                                   f"size of {', '.join(sizes_unknown)} unknown (no discovery "
                                   "or snapshot): set vm.NAME.vcpus and memory"))
        else:
            out.append(HostFailure(h, vms, True, placement))
    return out
