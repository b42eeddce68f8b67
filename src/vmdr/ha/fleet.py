"""The live fleet, as the operator commands see it: what runs where (asked of each host's
libvirt), hosts in maintenance and capacities (from etcd, :mod:`.records`), and the
placement rules of *every* VM (maintenance moves VMs that are not under HA too).

Like :mod:`.monitor`, this reaches hosts only through structural types (the hypervisor
driver's ``Hypervisor`` and ``Domain`` match them; the CLI passes a ``connect(host)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from vmdr.errors import HypervisorError
from vmdr.plan.inventory import Inventory

from .model import HAVM, ClusterState, HAPolicy, HostState, Readiness, VMState
from .ports import ConsolePort
from .records import HARecords

__all__ = ["Connect", "Live", "OpsDomain", "OpsHost", "all_rules", "live_state"]


class SizePort(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def vcpus(self) -> int: ...

    @property
    def memory_kib(self) -> int: ...


class OpsDomain(Protocol):
    @property
    def name(self) -> str: ...

    def state(self) -> str: ...

    def info(self) -> SizePort: ...

    def xml(self, *, inactive: bool = False, secure: bool = False) -> str: ...

    def migrate(self, dest_uri: str, *, migrate_uri: str | None = None,
                unsafe: bool = False) -> None: ...

    def frozen_disks(self, workdir: str
                     ) -> AbstractContextManager[dict[str, tuple[str, str]]]: ...

    def merge_frozen(self, workdir: str, originals: dict[str, tuple[str, str]] | None = None
                     ) -> list[str]: ...

    def wait_heartbeat(self, *, timeout: float = 300.0) -> float: ...

    def console(self) -> ConsolePort: ...

    def destroy(self) -> None: ...

    def start(self) -> None: ...

    def undefine(self) -> None: ...


class OpsHost(Protocol):
    uri: str

    def list_domains(self) -> list[str]: ...

    def lookup(self, name: str) -> OpsDomain: ...

    def create_transient(self, xml: str) -> OpsDomain: ...

    def define(self, xml: str) -> str: ...

    def close(self) -> None: ...


Connect = Callable[[str], OpsHost]  # inventory host name -> an open connection


@dataclass
class Live:
    """The fleet now."""

    state: ClusterState
    running: dict[str, str]  # VM -> the host it runs on (asked of libvirt)
    unreachable: dict[str, str] = field(default_factory=dict)  # host -> why
    maintenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    capacity_from: dict[str, str] = field(default_factory=dict)  # host -> inventory|agent


def live_state(inv: Inventory, connect: Connect, records: HARecords | None,
               hosts: Sequence[str] | None = None) -> Live:
    """Ask every host (or ``hosts``) what runs there; capacities from the inventory, else
    from the host's agent (``members/<host>``); maintenance from etcd."""
    maint = records.maintenance() if records is not None else {}
    members = records.members() if records is not None else {}
    running: dict[str, str] = {}
    sizes: dict[str, VMState] = {}
    unreachable: dict[str, str] = {}
    for hn in hosts if hosts is not None else sorted(inv.hosts):
        try:
            hv = connect(hn)
        except HypervisorError as exc:
            unreachable[hn] = exc.message
            continue
        try:
            for name in hv.list_domains():
                dom = hv.lookup(name)
                info = dom.info()
                if info.state in ("running", "paused"):
                    running[name] = hn
                    sizes[name] = VMState(name, hn, info.vcpus, info.memory_kib * 1024, True)
        except HypervisorError as exc:
            unreachable[hn] = exc.message
        finally:
            hv.close()
    host_states: dict[str, HostState] = {}
    cap_from: dict[str, str] = {}
    for h in inv.hosts.values():
        vcpus, memory, src = h.vcpus, h.memory, "inventory"
        m = members.get(h.name)
        if (vcpus is None or memory is None) and m:
            vcpus = vcpus or _int(m.get("cpus")) or None
            memory = memory or _int(m.get("memory_mib")) * 1024 * 1024 or None
            src = "agent"
        cap_from[h.name] = src
        host_states[h.name] = HostState(h.name, vcpus, memory, h.name not in unreachable,
                                        h.name in maint)
    vms: dict[str, VMState] = dict(sizes)
    for v in inv.vms.values():
        if v.name in vms:
            continue
        vms[v.name] = VMState(v.name, v.host, v.vcpus or 0, v.memory or 0, False,
                              v.vcpus is not None and v.memory is not None)
    return Live(ClusterState(host_states, vms), running, unreachable, maint, cap_from)


def _int(v: object) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0


def all_rules(inv: Inventory, policy: HAPolicy, names: Sequence[str]) -> HAPolicy:
    """``policy`` with placement rules for ``names`` too (VMs not under HA keep their
    inventory's anti-affinity and host affinity; VMs not in the inventory get none)."""
    rules = dict(policy.vms)
    for n in names:
        if n in rules:
            continue
        v = inv.vms.get(n)
        if v is None:
            rules[n] = HAVM(n, 1)
        else:
            rules[n] = HAVM(n, v.boot_group, v.depends_on, v.anti_affinity, v.affinity_hosts,
                            v.hosts_rule, Readiness("none"))
    return replace(policy, vms=rules)


def state_from_members(inv: Inventory, records: HARecords) -> tuple[ClusterState, list[str]]:
    """The cluster as the agents report it in etcd (``members/<host>``: capacity and
    running VMs), with hosts in maintenance; VM sizes from the inventory. A host without a
    live member (its agent is down) is down; one whose agent reports its libvirt down
    (``libvirt_ok: false``) is up but no target. Also notes on what was filled in."""
    members = records.members()
    maint = records.maintenance()
    notes: list[str] = []
    hosts: dict[str, HostState] = {}
    for h in inv.hosts.values():
        m = members.get(h.name)
        vcpus, memory = h.vcpus, h.memory
        if m is not None:
            vcpus = vcpus or _int(m.get("cpus")) or None
            memory = memory or _int(m.get("memory_mib")) * 1024 * 1024 or None
        else:
            notes.append(f"host {h.name}: no live agent in etcd (down)")
        if m is not None and m.get("libvirt_ok") is False:
            notes.append(f"host {h.name}: its libvirt does not answer "
                         f"({m.get('libvirt_error') or 'unreachable'}); no failover target")
        hosts[h.name] = HostState(h.name, vcpus, memory, m is not None, h.name in maint,
                                  libvirt=m is None or m.get("libvirt_ok") is not False)
    running: dict[str, str] = {}
    for name, m in sorted(members.items()):
        if name not in inv.hosts:
            continue
        for vm in m.get("running_vms") or []:
            if isinstance(vm, str):
                running[vm] = name
    vms: dict[str, VMState] = {}
    for v in inv.vms.values():
        where = running.get(v.name)
        vms[v.name] = VMState(v.name, where or v.host, v.vcpus or 0, v.memory or 0,
                              where is not None,
                              v.vcpus is not None and v.memory is not None)
    for vm, where in running.items():
        if vm not in vms:
            vms[vm] = VMState(vm, where, 0, 0, True, False)
    return ClusterState(hosts, vms), notes
