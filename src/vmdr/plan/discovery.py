"""What libvirt knows about the estate, as plain records, and how it places the VMs.

The plan job (``jobs/plan.py``) reads the hosts over read-only connections, each with a
deadline; a host that does not answer is described from the plan's cache
(:mod:`vmdr.plan.cache`), marked stale with the age of that reading. :func:`apply` puts
what was found into the inventory.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import datetime

from vmdr.plan.inventory import Inventory, VMPlan


@dataclass(frozen=True)
class DiscoveredVM:
    name: str
    host: str
    vcpus: int
    memory: int  # bytes
    state: str
    disks: tuple[tuple[str, int], ...] = ()

    @property
    def disk_bytes(self) -> int:
        return sum(s for _, s in self.disks)


@dataclass
class HostState:
    name: str
    reachable: bool
    read_at: datetime | None
    error: str | None = None
    vms: list[DiscoveredVM] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return not self.reachable and self.read_at is not None


def apply(inv: Inventory, hosts: dict[str, HostState]) -> dict[str, DiscoveredVM]:
    """Place VMs from discovery; add VMs found on hosts but absent from the config.

    A fresh reading wins over the configured host (the VM was moved: warn); a stale one
    only fills in a VM that has no configured host. Returns the facts per VM.
    """
    facts: dict[str, DiscoveredVM] = {}
    for st in sorted(hosts.values(), key=lambda s: (not s.reachable, s.name)):
        for v in st.vms:
            if v.name in facts or (v.name not in inv.vms and any(
                    fnmatch.fnmatchcase(v.name, pat) for pat in inv.settings.ignore_vms)):
                continue
            facts[v.name] = v
            vm = inv.vms.get(v.name)
            if vm is None:
                inv.vms[v.name] = VMPlan(v.name, host=st.name, declared=False)
            elif vm.host is None:
                vm.host = st.name
            elif vm.host != st.name and st.reachable:
                inv.warnings.append(f"{v.name} runs on {st.name}, but the inventory says "
                                    f"host = {vm.host!r}; using {st.name}")
                vm.host = st.name
    return facts
