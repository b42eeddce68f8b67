"""What libvirt knows about the estate, and the cache that keeps it for the bad day.

``discover`` asks each host with a ``uri`` (read-only connection, with a deadline) for its
VMs: vCPUs, memory, disk sizes, running state. Every answer is saved in a JSON cache
(``[plan] cache_file``, default ``<cache dir>/plan-facts.json``) with its time; a host that
does not answer is described from the cache, marked stale with the age of that reading.
Repository readings (:mod:`vmdr.plan.history`) are cached in the same file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import DomainNotFound, VmdrError
from vmdr.hypervisor import Hypervisor
from vmdr.plan import history
from vmdr.plan.inventory import Inventory, VMPlan
from vmdr.repository.cache import cache_root
from vmdr.timeutil import format_time, parse_time

Connector = Callable[[str], Hypervisor]
CACHE_VERSION = 1


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


def cache_path(inv: Inventory) -> str:
    return inv.settings.cache_file or os.path.join(cache_root(), "plan-facts.json")


def load_cache(path: str) -> dict[str, Any]:
    """The cached facts, or an empty cache when missing or unreadable (it is advisory)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if isinstance(doc, dict) and doc.get("version") == CACHE_VERSION:
            return doc
    except (OSError, ValueError):
        pass
    return {"version": CACHE_VERSION, "hosts": {}, "repositories": {}}


def save_cache(path: str, hosts: dict[str, HostState],
               repos: dict[str, history.RepoState], old: dict[str, Any]) -> None:
    """Write fresh readings over the old ones (atomically; failures are ignored)."""
    host_docs: dict[str, Any] = dict(old.get("hosts", {}))
    repo_docs: dict[str, Any] = dict(old.get("repositories", {}))
    doc = {"version": CACHE_VERSION, "hosts": host_docs, "repositories": repo_docs}
    for h in hosts.values():
        if h.reachable and h.read_at:
            host_docs[h.name] = {"read_at": format_time(h.read_at),
                                    "vms": [_vm_doc(v) for v in h.vms]}
    for r in repos.values():
        if r.reachable:
            repo_docs[r.name] = history.to_cache(r)
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _vm_doc(v: DiscoveredVM) -> dict[str, Any]:
    return {"name": v.name, "vcpus": v.vcpus, "memory": v.memory, "state": v.state,
            "disks": [list(d) for d in v.disks]}


def _from_cache(name: str, doc: dict[str, Any]) -> tuple[datetime | None, list[DiscoveredVM]]:
    try:
        vms = [DiscoveredVM(v["name"], name, int(v["vcpus"]), int(v["memory"]),
                            str(v["state"]), tuple((str(a), int(b)) for a, b in v["disks"]))
               for v in doc["vms"]]
        return parse_time(doc["read_at"]), vms
    except (KeyError, TypeError, ValueError):
        return None, []


def read_host(hv: Hypervisor, host: str) -> list[DiscoveredVM]:
    out = []
    for name in hv.list_domains():
        try:
            info = hv.domain(name)
        except DomainNotFound:  # undefined while we looked
            continue
        disks = tuple((d.target, d.virtual_size or 0) for d in info.disks
                      if d.device == "disk")
        out.append(DiscoveredVM(name, host, info.vcpus, info.memory_kib * 1024, info.state,
                                disks))
    return out


def discover(inv: Inventory, connector: Connector | None, now: datetime,
             timeout: float = 20.0, cached: dict[str, Any] | None = None) -> dict[str, HostState]:
    """Ask every host (in parallel, each within *timeout*); fall back to the cache."""
    results: dict[str, HostState] = {}
    threads = []

    def work(name: str, uri: str, connect: Connector) -> None:
        try:
            with connect(uri) as hv:
                vms = read_host(hv, name)
            results[name] = HostState(name, True, now, None, vms)
        except VmdrError as exc:
            results[name] = HostState(name, False, None, exc.message)
        except Exception as exc:  # a library failure means: unreachable for the plan
            results[name] = HostState(name, False, None, f"{type(exc).__name__}: {exc}")

    for host in inv.hosts.values():
        if connector is None or not host.uri:
            why = "discovery off (--offline)" if connector is None else "no uri configured"
            results[host.name] = HostState(host.name, False, None, why)
            continue
        th = threading.Thread(target=work, args=(host.name, host.uri, connector), daemon=True)
        th.start()
        threads.append((host.name, th))
    for name, th in threads:
        th.join(timeout)
        if name not in results:
            results[name] = HostState(name, False, None, f"no answer within {timeout:.0f}s")
    for name, st in results.items():
        doc = (cached or {}).get("hosts", {}).get(name)
        if not st.reachable and doc:
            st.read_at, st.vms = _from_cache(name, doc)
    return {n: results[n] for n in inv.hosts}


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
