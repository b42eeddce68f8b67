"""HA policy (from the one inventory) and cluster state (from the inventory or the agents),
as plain data. Every decision in :mod:`vmdr.ha` is a pure function of these and ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vmdr.errors import ConfigError
from vmdr.ha.settings import HASettings, parse_settings
from vmdr.plan.inventory import Inventory

__all__ = [
    "HAVM",
    "ClusterState",
    "HAPolicy",
    "HostState",
    "Readiness",
    "VMState",
    "load_policy",
    "state_from_inventory",
]


@dataclass(frozen=True)
class Readiness:
    """When a started VM counts as ready: ``check`` passes (agent: guest-agent heartbeat;
    tcp:PORT; exec:COMMAND through the guest agent; none: once started), then ``delay``
    seconds more. After ``timeout`` the next group starts anyway and the event says so."""

    check: str = "agent"
    delay: float = 0.0
    timeout: float = 300.0


@dataclass(frozen=True)
class HAVM:
    """The HA rules of one VM."""

    name: str
    priority: int  # = the inventory's boot_group: lower restarts first
    depends_on: tuple[str, ...] = ()
    anti_affinity: str | None = None
    affinity_hosts: tuple[str, ...] = ()
    hosts_rule: str = "must"
    ready: Readiness = Readiness()
    # without shared storage (vmdr.ha.noshared): "local" = its disks live only on its
    # host; restarted elsewhere from the newest backup in ``repository`` (a
    # [repositories.NAME]) through instant restore; ``replica_host``: where its hot-site
    # replica is (reported; HA does not start replica standbys)
    storage: str = "shared"
    repository: str | None = None
    replica_host: str | None = None

    @property
    def local(self) -> bool:
        return self.storage == "local"


@dataclass(frozen=True)
class HAPolicy:
    settings: HASettings
    vms: dict[str, HAVM]  # only VMs under HA
    racks: dict[str, str | None]  # host -> its rack (None: in no rack)
    cpu_overcommit: float = 1.0
    groups: dict[str, str] = field(default_factory=dict)  # every VM with anti_affinity

    def group_members(self, group: str) -> list[str]:
        """Every VM of anti-affinity ``group`` (under HA or not)."""
        return sorted(vm for vm, g in self.groups.items() if g == group)

    def unit(self, group: str, host: str) -> str:
        """The anti-affinity unit of ``host`` for ``group``: the host, or its rack (a host
        in no rack is its own rack)."""
        if self.settings.scope(group) == "rack":
            return self.racks.get(host) or f"host:{host}"
        return host


@dataclass(frozen=True)
class HostState:
    name: str
    vcpus: int | None  # None: unknown capacity, never a failover target
    memory: int | None  # bytes
    up: bool = True
    maintenance: bool = False
    # False: its agent renews its lease but its libvirt does not answer (libvirtd died):
    # alive (never fenced, its VMs run on) but no target — a start there would fail
    libvirt: bool = True

    @property
    def eligible(self) -> bool:
        return self.up and self.libvirt and not self.maintenance \
            and self.vcpus is not None and self.memory is not None


@dataclass(frozen=True)
class VMState:
    name: str
    host: str | None
    vcpus: int = 0
    memory: int = 0  # bytes
    running: bool = True
    size_known: bool = True


@dataclass(frozen=True)
class ClusterState:
    hosts: dict[str, HostState]
    vms: dict[str, VMState]

    def fail(self, hosts: set[str] | frozenset[str]) -> ClusterState:
        """The same cluster with ``hosts`` down (their VMs no longer running)."""
        return ClusterState(
            {n: replace(h, up=h.up and n not in hosts) for n, h in self.hosts.items()},
            {n: replace(v, running=False) if v.running and v.host in hosts else v
             for n, v in self.vms.items()})


def load_policy(inv: Inventory) -> HAPolicy:
    """The HA policy of the inventory: ``[ha]`` and the VMs with HA on; ConfigError naming
    the key on the first problem (timings, scopes, unsatisfiable anti-affinity)."""
    s = parse_settings(inv.path, inv.ha_table)
    vms: dict[str, HAVM] = {}
    for vm in inv.vms.values():
        if not inv.ha_enabled(vm):
            continue
        vms[vm.name] = HAVM(
            vm.name, vm.boot_group, vm.depends_on, vm.anti_affinity, vm.affinity_hosts,
            vm.hosts_rule,
            Readiness(vm.ready_check or s.ready_check,
                      s.ready_delay if vm.ready_delay_s is None else vm.ready_delay_s,
                      s.ready_timeout),
            vm.ha_storage, vm.ha_repository, _replica_host(inv, vm.name))
    racks = {h.name: inv.unit(h.location, "rack") for h in inv.hosts.values()}
    groups = {v.name: v.anti_affinity for v in inv.vms.values() if v.anti_affinity}
    policy = HAPolicy(s, vms, racks, inv.settings.cpu_overcommit, groups)
    _check_groups(inv, policy)
    return policy


def _replica_host(inv: Inventory, vm: str) -> str | None:
    """The inventory host that holds *vm*'s replica (``replica_to`` naming a host)."""
    r = inv.replicas.get(vm)
    return r.to if r is not None and r.to in inv.hosts else None


def _check_groups(inv: Inventory, policy: HAPolicy) -> None:
    used = {v.anti_affinity for v in inv.vms.values() if v.anti_affinity}
    for group, _ in policy.settings.anti_affinity_scopes:
        if group not in used:
            raise ConfigError(f"{inv.path}: ha.anti_affinity.{group}: no VM is in "
                              f"anti-affinity group {group!r}")
    for group in sorted(used):
        members = [v for v in inv.vms.values() if v.anti_affinity == group]
        scope = policy.settings.scope(group)
        # each member needs its own unit (host or rack) among the hosts it may use
        allowed = {}
        for v in members:
            hosts = (v.affinity_hosts if v.affinity_hosts and v.hosts_rule == "must"
                     else tuple(inv.hosts))
            allowed[v.name] = {policy.unit(group, h) for h in hosts}
        if _matching(allowed) < len(members):
            units = {u for us in allowed.values() for u in us}
            first = sorted(v.name for v in members)[-1]
            raise ConfigError(
                f"{inv.path}: vm.{first}.anti_affinity: group {group!r} has "
                f"{len(members)} VMs ({', '.join(sorted(v.name for v in members))}) but "
                f"only {len(units)} {scope}{'s' if len(units) != 1 else ''} to keep them "
                "apart")


def _matching(allowed: dict[str, set[str]]) -> int:
    """Size of a maximum matching VM → unit (each unit used once): Kuhn's algorithm."""
    owner: dict[str, str] = {}

    def augment(vm: str, seen: set[str]) -> bool:
        for u in sorted(allowed[vm]):
            if u in seen:
                continue
            seen.add(u)
            if u not in owner or augment(owner[u], seen):
                owner[u] = vm
                return True
        return False

    return sum(1 for vm in sorted(allowed) if augment(vm, set()))


def state_from_inventory(inv: Inventory, *, down: set[str] | None = None,
                         maintenance: set[str] | None = None,
                         libvirt_down: set[str] | None = None) -> ClusterState:
    """The cluster as the inventory declares it: each VM running on its ``host`` with its
    declared size, every host up except ``down``; ``libvirt_down`` hosts are up (their VMs
    run on) but no target."""
    down, maint, lv = down or set(), maintenance or set(), libvirt_down or set()
    hosts = {h.name: HostState(h.name, h.vcpus, h.memory, h.name not in down,
                               h.name in maint, h.name not in lv)
             for h in inv.hosts.values()}
    vms = {v.name: VMState(v.name, v.host, v.vcpus or 0, v.memory or 0,
                           v.host is not None and v.host not in down,
                           v.vcpus is not None and v.memory is not None)
           for v in inv.vms.values()}
    return ClusterState(hosts, vms)
