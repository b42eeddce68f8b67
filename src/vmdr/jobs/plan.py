"""``vmdr plan``: one evaluation of the estate — inventory + discovery + repositories →
coverage.

The I/O half of the plan; everything it produces is plain data for the pure functions of
:mod:`vmdr.plan`:

* :func:`discover` asks every host with a ``uri`` (read-only libvirt connection) for its
  VMs: vCPUs, memory, disk sizes, running state;
* :func:`load_repositories` opens every declared repository read-only (no lock, nothing
  written) and lists its VM snapshots with their verification and restore records;
* both run in parallel, each host or repository within a deadline; one that does not
  answer is described from the plan's cache (:mod:`vmdr.plan.cache`), marked stale;
* :func:`evaluate` ties them together.

The caller supplies how to reach hosts (*connector*, None = offline) and repositories
(*opener*), and ``now``; nothing here reads the clock or prompts.
:func:`repository_opener` and :func:`readonly_connector` are the real ones.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from vmdr.config import Config
from vmdr.errors import DomainNotFound, UsageError, VmdrError
from vmdr.hypervisor import Hypervisor, connect
from vmdr.jobs import tape_plan as tapes
from vmdr.plan import (
    cache,
    coverage,
    discovery,
    history,
    hotsite,
    inventory,
    recovery,
    recovery_runs,
)
from vmdr.plan.coverage import Coverage
from vmdr.plan.discovery import DiscoveredVM, HostState
from vmdr.plan.hafacts import HAFacts
from vmdr.plan.history import Copy, RepoState
from vmdr.plan.inventory import Inventory, RepoDecl
from vmdr.repository.cache import cache_root
from vmdr.repository.opening import OpenOptions, Passphrase, open_repository
from vmdr.repository.repo import Repository
from vmdr.storage.registry import schemes

Connector = Callable[[str], Hypervisor]
Opener = Callable[[RepoDecl], Repository]
R = TypeVar("R")

__all__ = ["Connector", "Opener", "cache_path", "discover", "evaluate", "load_repositories",
           "read_host", "read_repository", "readonly_connector", "repository_opener"]


def evaluate(cfg: Config, *, opener: Opener, connector: Connector | None, now: datetime,
             timeout: float = 20.0, use_cache: bool = True,
             ha: Callable[[Inventory], HAFacts] | None = None) -> Coverage:
    """The coverage of the estate described by *cfg*, as of *now*. *ha* reads the fleet's
    HA facts (given the inventory with the discovered placement); None: HA not proven."""
    inv = inventory.from_config(cfg)
    if not inv.vms and not inv.hosts:
        raise UsageError(f"{inv.path}: the inventory is empty: declare [hosts.NAME], "
                         "[repositories.NAME] and [vm.NAME] (see examples/estate.toml)")
    path = cache_path(inv)
    cached = cache.load(path) if use_cache else {}
    hosts = discover(inv, connector, now, timeout, cached)
    facts = discovery.apply(inv, hosts)
    inventory.check_placed(inv)
    repos = load_repositories(inv, opener, now, timeout, cached.get("repositories"))
    if use_cache:
        cache.save(path, hosts, repos, cached)
    cov = coverage.compute(inv, facts, hosts, repos, now, ha(inv) if ha else None)
    hot = hotsite_facts(cfg, inv, timeout, offline=connector is None)
    if hot is not None:
        hotsite.apply(cov, hot, recovery.reports_dir(cfg))
    return cov


def hotsite_facts(cfg: Config, inv: Inventory, timeout: float, *,
                  offline: bool = False) -> hotsite.HotSite | None:
    """The recovery plans, their last tests and each replica's newest restore point, read
    from the state kept at its DR host (None when the config has neither). ``offline``
    (``--offline``): no DR host is contacted; the replicas count as unknown."""
    if not inv.replicas and not cfg.raw.get(recovery.SECTION):
        return None
    plans = list(recovery.load_plans(cfg, inv).values())
    reports = recovery.reports_dir(cfg)
    hs = hotsite.HotSite(plans, {p.name: recovery_runs.last_run(reports, p.name, ("test",))
                                 for p in plans})
    from vmdr.jobs.replicate import load_state, redact_uri
    from vmdr.jobs.replicate_site import Site

    if offline:
        if inv.replicas:
            hs.notes.append("--offline: the replicas' state was not read at their DR hosts; "
                            "their coverage is not counted")
        hs.replicas = {vm: hotsite.ReplicaFact(
            vm, d.to if d.to in inv.hosts else None, d.to, None, "not read (--offline)")
            for vm, d in inv.replicas.items()}
        return hs

    def read(vm: str) -> Callable[[], hotsite.ReplicaFact]:
        decl = inv.replicas[vm]
        host = inv.hosts.get(decl.to)
        uri = host.uri if host and host.uri else decl.to
        root = decl.directory or (f"{host.target_dir.rstrip('/')}/vmdr-replicas" if host
                                  else recovery.DEFAULT_REPLICA_ROOT)

        def go() -> hotsite.ReplicaFact:
            name = host.name if host else None
            try:
                with Site(uri) as site:
                    st = load_state(site, f"{root.rstrip('/')}/{vm}")
            except VmdrError as exc:
                return hotsite.ReplicaFact(vm, name, redact_uri(uri), None, exc.message)
            newest = st.newest if st else None
            return hotsite.ReplicaFact(vm, name, redact_uri(uri),
                                       datetime.fromisoformat(newest.time) if newest else None)
        return go

    def failed(vm: str, why: str) -> hotsite.ReplicaFact:
        hs.notes.append(f"{vm}: the replica's state could not be read ({why})")
        return hotsite.ReplicaFact(vm, None, inv.replicas[vm].to, None, why)

    hs.replicas = _each_within({vm: read(vm) for vm in inv.replicas}, timeout, failed)
    return hs


def cache_path(inv: Inventory) -> str:
    return inv.settings.cache_file or os.path.join(cache_root(), "plan-facts.json")


# ------------------------------------------------------------------------------ hosts
def readonly_connector(uri: str) -> Hypervisor:
    return connect(uri, readonly=True)


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
    work: dict[str, Callable[[], HostState]] = {}

    def reader(name: str, uri: str, connect_: Connector) -> Callable[[], HostState]:
        def read() -> HostState:
            with connect_(uri) as hv:
                vms = read_host(hv, name)
            return HostState(name, True, now, None, vms)
        return read

    for host in inv.hosts.values():
        if connector is None or not host.uri:
            why = "discovery off (--offline)" if connector is None else "no uri configured"
            results[host.name] = HostState(host.name, False, None, why)
        else:
            work[host.name] = reader(host.name, host.uri, connector)
    results.update(_each_within(work, timeout,
                                lambda name, err: HostState(name, False, None, err)))
    for name, st in results.items():
        doc = (cached or {}).get("hosts", {}).get(name)
        if not st.reachable and doc:
            st.read_at, st.vms = cache.host(name, doc)
    return {n: results[n] for n in inv.hosts}


# ------------------------------------------------------------------------ repositories
def repository_opener(key_file: str | None, password_file: str | None) -> Opener:
    """Open a declared repository with its own ``key_file``/``password_file``, else with
    these (the global options) or ``VMDR_PASSWORD``; no lock, never prompts."""
    schemes()  # load every backend now: the registry's lazy loading is not thread-safe

    def open_repo(decl: RepoDecl) -> Repository:
        kfile = decl.key_file or (None if decl.password_file else key_file)
        # a repository's own password_file wins over the environment
        pw = Passphrase(env=None if decl.password_file else "VMDR_PASSWORD",
                        file=decl.password_file or password_file, prompt=None,
                        sources=f"password_file for repository {decl.name} in the "
                                "inventory, --password-file or VMDR_PASSWORD")
        return open_repository(OpenOptions(decl.url, pw, kfile), None)
    return open_repo


def read_repository(repo: Repository, name: str) -> list[Copy]:
    """The VM snapshots of *repo* (declared as *name*) with their verifications and
    restores."""
    # one listing tells which snapshots have attachments at all (most have none), so a
    # remote repository is not asked once per snapshot
    attached = repo.snapshots_with_attachments()
    out = []
    for s in repo.list_snapshots():
        if s.meta.get("kind") != "vm":
            continue
        cfg = s.meta.get("config") or {}
        vers, rests = history.from_attachments(
            repo.attachments(s.id) if s.id in attached else (), repo.id)
        mem = cfg.get("memory_kib")
        out.append(Copy(
            name, s.name, s.id, s.time, sum(d.size for d in s.disks),
            int(cfg["vcpus"]) if isinstance(cfg.get("vcpus"), int) else None,
            int(mem) * 1024 if isinstance(mem, int) else None,
            tuple((d.name, d.size) for d in s.disks), vers, rests))
    return out


def load_repositories(inv: Inventory, opener: Opener, now: datetime, timeout: float = 30.0,
                      cached: dict[str, Any] | None = None) -> dict[str, RepoState]:
    """Read every declared repository (in parallel, each within *timeout* seconds)."""
    def reader(decl: RepoDecl) -> Callable[[], RepoState]:
        def read() -> RepoState:
            if tapes.is_tape_url(decl.url):  # tapes: their copies from the tape catalog
                cat, pool = tapes.catalog_of(decl.url)
                return RepoState(decl.name, True, now, None,
                                 tapes.tape_copies(cat, decl.name, decl.vault, pool))
            with opener(decl) as repo:
                copies = read_repository(repo, decl.name)
            return RepoState(decl.name, True, now, None, copies)
        return read

    results = _each_within({d.name: reader(d) for d in inv.repositories.values()}, timeout,
                           lambda name, err: RepoState(name, False, None, err))
    for name, st in results.items():
        if not st.reachable and cached and name in cached:
            st.read_at, st.copies = cache.repository(cached[name])
    return {n: results[n] for n in inv.repositories}


# --------------------------------------------------------------------------- deadlines
def _each_within(work: dict[str, Callable[[], R]], timeout: float,
                 failed: Callable[[str, str], R]) -> dict[str, R]:
    """Run every reader on its own (daemon) thread and wait up to *timeout* seconds for
    each; a reader that raises or does not answer in time is replaced by ``failed(name,
    why)``. A thread left behind finishes unobserved."""
    results: dict[str, R] = {}

    def run(name: str, read: Callable[[], R]) -> None:
        try:
            results[name] = read()
        except VmdrError as exc:
            results[name] = failed(name, exc.message)
        except Exception as exc:  # a library failure means: unreachable for the plan
            results[name] = failed(name, f"{type(exc).__name__}: {exc}")

    threads = []
    for name, read in work.items():
        th = threading.Thread(target=run, args=(name, read), daemon=True)
        th.start()
        threads.append((name, th))
    out: dict[str, R] = {}
    for name, th in threads:
        th.join(timeout)
        out[name] = results[name] if name in results else failed(
            name, f"no answer within {timeout:.0f}s")
    return out
