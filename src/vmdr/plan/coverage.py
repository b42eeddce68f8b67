"""Disaster coverage: pure functions of the inventory, the known copies and ``now``.

For every VM and every level of the taxonomy: which copies survive the level's blast radius,
the achieved RPO (age of the newest surviving copy), the estimated RTO (retrieval +
restore size ÷ throughput + boot time) of the copy the plan would restore, the last
successful boot verification, and whether the VM's targets are met. Estate-wide: 3-2-1-1-0
per VM and the N+1 host check.
"""

from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmdr.plan import capacity, taxonomy
from vmdr.plan.discovery import DiscoveredVM, HostState
from vmdr.plan.hafacts import HAFacts, ha_verdict
from vmdr.plan.history import Copy, RepoState
from vmdr.plan.inventory import Inventory, RepoDecl, VMPlan
from vmdr.plan.units import fmt_duration
from vmdr.storage.registry import redact


@dataclass(frozen=True)
class Blast:
    """The blast radius of one disaster level around one host."""

    label: str  # e.g. "building HQ-1"
    unit: str | None  # location id, or None for vm/host/fabric scopes
    hosts: frozenset[str]
    repos: frozenset[str]


@dataclass
class LevelCoverage:
    level: str
    required: bool
    blast: Blast
    covered: bool
    copies: list[Copy]  # surviving copies, newest first
    chosen: Copy | None  # the copy the plan restores
    rpo_s: float | None
    rto_estimate_s: float | None
    last_verified: datetime | None
    rpo_met: bool | None
    rto_met: bool | None
    stale: bool
    gap: str | None
    unknown: bool = False  # a repository outside the blast radius could not be read
    ha: bool = False  # host level: covered by HA (enabled, admitted, failover-tested)
    ha_gap: str | None = None  # host level of an HA VM: the HA condition that fails
    replica: str | None = None  # covered by a hot-site replica (vmdr.plan.hotsite)


@dataclass
class Rule32110:
    copies: int
    media: int
    offsite: bool
    immutable: bool
    errors: int
    verified: bool

    @property
    def ok(self) -> bool:
        return (self.copies >= 3 and self.media >= 2 and self.offsite and self.immutable
                and self.errors == 0 and self.verified)

    def missing(self) -> list[str]:
        """What is missing, each with the fix."""
        out = []
        if self.copies < 3:
            out.append(f"{self.copies} cop{'y' if self.copies == 1 else 'ies'} "
                       "(live VM + backups), need 3: `vmdr copy` to another repository")
        if self.media < 2:
            out.append(f"{self.media} kind(s) of backup media, need 2: copy to object "
                       "storage or tape as well")
        if not self.offsite:
            out.append("no offsite copy: copy to a repository outside the VM's building")
        if not self.immutable:
            out.append("no immutable copy: copy to an immutable repository (object lock, "
                       "append-only) or to tapes kept in a vault")
        if self.errors:
            out.append(f"the latest verification failed in {self.errors} repositor"
                       f"{'y' if self.errors == 1 else 'ies'}: investigate with `vmdr verify`")
        elif not self.verified:
            out.append("never verified: run `vmdr verify --boot`")
        return out


@dataclass
class VMCoverage:
    vm: VMPlan
    host: str
    need: capacity.Need
    disk_bytes: int | None
    state: str | None  # running state from discovery
    facts_age_s: float | None  # age of the discovery reading (stale when from the cache)
    boot_s: float
    levels: dict[str, LevelCoverage]
    rule: Rule32110
    last_verified: datetime | None
    problems: list[str] = field(default_factory=list)


@dataclass
class Coverage:
    now: datetime
    inv: Inventory
    vms: dict[str, VMCoverage]
    hosts: dict[str, HostState]
    repos: dict[str, RepoState]
    n1: list[capacity.HostFailure]
    throughput: dict[str, tuple[float, str]]  # repo -> (bytes/s, "measured"|"configured"|…)
    ha: HAFacts | None = None
    n1_source: str = "inventory figures"
    hotsite: Any = None  # vmdr.plan.hotsite.HotSite, when replicas or recovery plans exist

    def problems(self) -> list[str]:
        out = [p for v in self.vms.values() for p in v.problems]
        for r in self.repos.values():
            if not r.reachable:
                what = "using a cached reading" if r.stale else "its copies are unknown"
                out.append(f"repository {r.name}: unreachable ({r.error}); {what}")
        return out


def blast_radius(inv: Inventory, level: taxonomy.Level, vm: str, host: str) -> Blast:
    repos = inv.repositories.values()
    if level.scope == "vm":
        return Blast(f"VM {vm}", None, frozenset(), frozenset())
    h = inv.hosts[host]
    if level.scope == "fabric" and h.fabrics:
        fab = set(h.fabrics)
        hosts = {x.name for x in inv.hosts.values() if fab & set(x.fabrics)} | {host}
        return Blast(f"fabric {', '.join(h.fabrics)}", None, frozenset(hosts),
                     frozenset(r.name for r in repos if fab & set(r.fabrics)
                               or r.host in hosts))
    unit = inv.unit(h.location, level.scope) if level.scope in taxonomy.KIND_RANK else None
    if unit is None:
        return Blast(f"host {host}", None, frozenset({host}),
                     frozenset(r.name for r in repos if r.host == host))
    loc = inv.locations[unit]
    hosts = {x.name for x in inv.hosts.values() if inv.within(x.location, unit)}
    return Blast(f"{loc.kind} {loc.name}", unit, frozenset(hosts),
                 frozenset(r.name for r in repos
                           if inv.within(r.location, unit) or r.host in hosts))


def restore_rates(copies: list[Copy]) -> list[float]:
    """Measured restore rates (bytes/s): of recorded restores (virtual size ÷ time), and
    of verifications that recorded one."""
    out = [r.throughput for c in copies for r in c.restores if r.throughput]
    out += [v.restore_bytes / v.restore_s for c in copies for v in c.verifications
            if v.restore_s and v.restore_bytes and v.restore_s > 0]
    return out


def boot_times(copies: list[Copy]) -> list[float]:
    """Measured boot times (s): heartbeats of passed boot verifications and of restores
    that were started."""
    return ([v.heartbeat_s for c in copies for v in c.verifications
             if v.boot_passed and v.heartbeat_s]
            + [r.heartbeat_s for c in copies for r in c.restores if r.heartbeat_s])


def repo_throughput(inv: Inventory, repos: dict[str, RepoState]) -> dict[str, tuple[float, str]]:
    out = {}
    for decl in inv.repositories.values():
        samples = restore_rates(repos[decl.name].copies)
        if decl.throughput:
            out[decl.name] = (decl.throughput, "configured")
        elif samples:
            out[decl.name] = (statistics.median(samples),
                              f"measured ({len(samples)} restores)")
        else:
            out[decl.name] = (inv.settings.throughput[decl.media], f"default for {decl.media}")
    return out


def rto_of(inv: Inventory, decl: RepoDecl, copy: Copy, bps: float, boot_s: float) -> float:
    retrieval = inv.vaults[decl.vault].retrieval_s if decl.vault else 0.0
    return retrieval + copy.size / bps + boot_s


def choose(inv: Inventory, alive: list[Copy], rpo_target: float | None,
           tp: dict[str, tuple[float, str]], boot_s: float,
           now: datetime) -> tuple[Copy | None, float | None]:
    """The copy to restore among *alive* (newest first) and its estimated RTO: of each
    repository's newest copy, the fastest to restore that meets the RPO target (or the
    newest copy when none does)."""
    newest_per_repo: dict[str, Copy] = {}
    for c in alive:
        newest_per_repo.setdefault(c.repo, c)
    if not newest_per_repo:
        return None, None

    def est(c: Copy) -> float:
        return rto_of(inv, inv.repositories[c.repo], c, tp[c.repo][0], boot_s)

    fresh = [c for c in newest_per_repo.values()
             if rpo_target is None or (now - c.time).total_seconds() <= rpo_target]
    chosen = min(fresh, key=lambda c: (est(c), -c.time.timestamp())) if fresh else alive[0]
    return chosen, est(chosen)


def _level(inv: Inventory, cov: VMCoverage, level: taxonomy.Level, copies: list[Copy],
           repos: dict[str, RepoState], tp: dict[str, tuple[float, str]],
           now: datetime) -> LevelCoverage:
    vm = cov.vm
    blast = blast_radius(inv, level, vm.name, cov.host)
    alive = sorted((c for c in copies if c.repo not in blast.repos),
                   key=lambda c: c.time, reverse=True)
    required = level.key in inv.required_levels(vm)
    rpo_t, rto_t = inv.rpo_target(vm), inv.rto_target(vm)
    chosen, rto = choose(inv, alive, rpo_t, tp, cov.boot_s, now)
    rpo = (now - alive[0].time).total_seconds() if alive else None
    passed = [v.time for c in alive for v in c.verifications if v.boot_passed]
    stale = any(repos[c.repo].stale for c in alive)
    lc = LevelCoverage(
        level.key, required, blast, bool(alive), alive, chosen, rpo, rto,
        max(passed) if passed else None,
        None if rpo_t is None or rpo is None else rpo <= rpo_t,
        None if rto_t is None or rto is None else rto <= rto_t, stale, None)
    lc.gap = _gap(inv, vm.name, level, lc, copies, repos)
    lc.unknown = any(not st.reachable and not st.stale and n not in blast.repos
                     for n, st in repos.items())
    return lc


def rpo_fix(inv: Inventory, vm: str, lc: LevelCoverage, copies: list[Copy]) -> str:
    """How to bring the copy outside the blast radius within the RPO target."""
    target = fmt_duration(inv.rpo_target(inv.vms[vm]))
    newest = max(copies, key=lambda c: c.time)
    dst = inv.repositories[lc.copies[0].repo]
    if newest.repo == dst.name:
        return f"back up at least every {target}"
    src = inv.repositories[newest.repo]
    return (f"run `vmdr copy {vm} --latest 1 --repo {shlex.quote(redact(src.url))} --to "
            f"{shlex.quote(redact(dst.url))}` at least every {target}")


def _gap(inv: Inventory, vm: str, level: taxonomy.Level, lc: LevelCoverage,
         copies: list[Copy], repos: dict[str, RepoState]) -> str | None:
    blast = lc.blast
    unread = sorted(r.name for r in repos.values() if not r.reachable and not r.stale)
    unknown = [r for r in unread if r not in blast.repos]
    note = (f" (repositories {', '.join(unknown)} could not be read: copies there are "
            "unknown)") if unknown else ""
    if lc.covered:
        if lc.required and lc.rpo_met is False:
            return (f"{vm} misses its RPO for a {level.title.lower()}: the newest copy outside "
                    f"{blast.label} is {fmt_duration(lc.rpo_s)} old (target "
                    f"{fmt_duration(inv.rpo_target(inv.vms[vm]))}); "
                    f"{rpo_fix(inv, vm, lc, copies)}")
        if lc.required and lc.rto_met is False:
            return (f"{vm} misses its RTO for a {level.title.lower()}: restoring from "
                    f"{lc.chosen.repo if lc.chosen else '?'} takes about "
                    f"{fmt_duration(lc.rto_estimate_s)} (target "
                    f"{fmt_duration(inv.rto_target(inv.vms[vm]))}); keep a copy on faster "
                    "media nearer the recovery hosts")
        return None
    if not copies:
        why = (f" (none could be read: {', '.join(unread)})" if len(unread) == len(repos)
               else f" (could not read {', '.join(unread)})" if unread else "")
        return (f"{vm} has no known copy in any repository{why}: run `vmdr backup {vm}` to a "
                "declared repository, or make the repositories readable")
    held = sorted({c.repo for c in copies})
    outside = [r.name for r in inv.repositories.values() if r.name not in blast.repos]
    where = blast.label.split(" ", 1)[-1]
    if outside:
        src = inv.repositories[max(copies, key=lambda c: c.time).repo]
        dst = inv.repositories[outside[0]]
        fix = (f"add a `vmdr copy` to a repository outside {where}, e.g. `vmdr copy {vm} "
               f"--repo {shlex.quote(redact(src.url))} --to {shlex.quote(redact(dst.url))}` "
               f"({dst.name})")
    else:
        fix = (f"add a `vmdr copy` to a repository outside {where} (declare one in "
               "[repositories])")
    return (f"{vm} is not covered for a {level.title.lower()}: every copy is in "
            f"{blast.label} ({', '.join(held)}); {fix}.{note}")


def _rule(inv: Inventory, vm: VMPlan, host: str, copies: list[Copy]) -> Rule32110:
    held = {c.repo for c in copies}
    decls = [inv.repositories[r] for r in held]
    offsite = blast_radius(inv, taxonomy.level("building"), vm.name, host)
    errors, verified = 0, False
    for r in held:
        vers = sorted((v for c in copies if c.repo == r for v in c.verifications),
                      key=lambda v: v.time)
        if vers and vers[-1].status != "passed":
            errors += 1
        verified = verified or any(v.status == "passed" for v in vers)
    return Rule32110(1 + len(held), len({d.media for d in decls}),
                     any(r not in offsite.repos for r in held),
                     any(d.immutable or d.vault for d in decls), errors, verified)


def compute(inv: Inventory, facts: dict[str, DiscoveredVM], hosts: dict[str, HostState],
            repos: dict[str, RepoState], now: datetime, ha: HAFacts | None = None) -> Coverage:
    """The coverage of every placed VM (call ``inventory.check_placed`` first). ``ha``: the
    HA facts of the fleet (see :mod:`vmdr.plan.hafacts`); without them no VM counts as
    covered by HA at the host level ("not proven")."""
    by_vm: dict[str, list[Copy]] = {}
    for st in repos.values():
        for c in st.copies:
            by_vm.setdefault(c.vm, []).append(c)
    tp = repo_throughput(inv, repos)
    needs: dict[str, capacity.Need] = {}
    out: dict[str, VMCoverage] = {}
    for vm in sorted(inv.vms.values(), key=lambda v: v.name):
        copies = sorted(by_vm.get(vm.name, []), key=lambda c: c.time)
        f = facts.get(vm.name)
        newest = copies[-1] if copies else None
        needs[vm.name] = capacity.Need(
            vm.name, f.vcpus if f else vm.vcpus or (newest.vcpus if newest else None),
            f.memory if f else vm.memory or (newest.memory if newest else None))
        beats = boot_times(copies)
        hs = hosts.get(vm.host or "")
        age = (now - hs.read_at).total_seconds() if f and hs and hs.read_at else None
        passed = [v.time for c in copies for v in c.verifications if v.boot_passed]
        cov = VMCoverage(
            vm, vm.host or "", needs[vm.name],
            f.disk_bytes if f else (newest.size if newest else None), f.state if f else None,
            age, statistics.median(beats) if beats else inv.settings.boot_time_s, {},
            _rule(inv, vm, vm.host or "", copies), max(passed) if passed else None)
        for level in taxonomy.LEVELS:
            cov.levels[level.key] = _level(inv, cov, level, copies, repos, tp, now)
        _apply_ha(inv, cov, ha, now)
        cov.problems = vm_problems(inv, cov, copies, now)
        out[vm.name] = cov
    if ha is not None and ha.n1 is not None:
        return Coverage(now, inv, out, hosts, repos, ha.n1, tp, ha, ha.n1_source)
    src = ha.n1_source if ha is not None else "inventory figures"
    return Coverage(now, inv, out, hosts, repos, capacity.n_plus_one(inv, needs), tp, ha, src)


def _apply_ha(inv: Inventory, cov: VMCoverage, ha: HAFacts | None, now: datetime) -> None:
    """The host level of an HA VM: covered by HA only when the rule of
    :mod:`vmdr.plan.hafacts` holds; a restart elsewhere loses no data (shared storage) or
    the writes since its newest surviving copy (``ha_storage = "local"``: restarted from
    a replica or backup), and takes the restart decision plus the guest's readiness."""
    lc = cov.levels.get("host")
    vm = cov.vm
    if lc is None or not vm.declared:
        return
    covered, why = ha_verdict(ha, vm.name, inv.ha_enabled(vm), now,
                              inv.settings.test_interval_s)
    lc.ha, lc.ha_gap = covered, why
    if not covered:
        if why and lc.gap:
            lc.gap = f"{lc.gap} HA does not cover it: {why}"
        elif why and not lc.covered and lc.required:
            lc.gap = f"{vm.name} is not covered for a host failure: {why}"
        return
    assert ha is not None
    f = ha.vms.get(vm.name)
    if vm.ha_storage == "local":
        # no shared storage: HA restarts it from its newest copy that survives the host
        # (replica or backup, vmdr.ha.noshared): the RPO is that copy's age, as computed
        if not lc.covered:
            lc.ha, lc.ha_gap = False, ("ha_storage = \"local\" and no copy of it survives "
                                       "the host: HA has nothing to restart it from")
            lc.gap = f"{lc.gap} HA does not cover it: {lc.ha_gap}" if lc.gap else lc.ha_gap
            return
        lc.gap, lc.unknown = None, False
    else:
        lc.covered, lc.rpo_s, lc.rpo_met, lc.gap, lc.unknown = True, 0.0, True, None, False
    rto = (ha.restart_s or 0.0) + (f.ready_s if f and f.ready_s is not None else cov.boot_s)
    lc.rto_estimate_s = rto
    target = inv.rto_target(vm)
    lc.rto_met = None if target is None else rto <= target


def vm_problems(inv: Inventory, cov: VMCoverage, copies: list[Copy],
              now: datetime) -> list[str]:
    name = cov.vm.name
    if not cov.vm.declared:
        return [f"{name}: found on {cov.host} but not in the inventory (no owner, tier or "
                "targets): add a [vm.NAME] table"]
    out = []
    for lc in cov.levels.values():
        if not lc.required:
            continue
        title = taxonomy.level(lc.level).title.lower()
        if not lc.covered:
            out.append(f"{name}: lacks required level {lc.level}: {lc.gap}")
            continue
        if lc.rpo_met is False:
            out.append(f"{name}: misses RPO for a {title}: newest copy is "
                       f"{fmt_duration(lc.rpo_s)} old, target "
                       f"{fmt_duration(inv.rpo_target(cov.vm))}; "
                       f"{rpo_fix(inv, name, lc, copies)}")
        if lc.rto_met is False:
            out.append(f"{name}: misses RTO for a {title}: estimated "
                       f"{fmt_duration(lc.rto_estimate_s)}, target "
                       f"{fmt_duration(inv.rto_target(cov.vm))}")
    limit = inv.settings.verify_max_age_s
    if cov.last_verified is None:
        out.append(f"{name}: no successful boot verification on record (policy: younger "
                   f"than {fmt_duration(limit)}): run `vmdr verify --boot {name}`")
    elif (now - cov.last_verified).total_seconds() > limit:
        out.append(f"{name}: last successful boot verification is "
                   f"{fmt_duration((now - cov.last_verified).total_seconds())} old (policy: "
                   f"younger than {fmt_duration(limit)}): run `vmdr verify --boot {name}`")
    return out
