"""``vmdr recovery check [PLAN]``: validate recovery plans against both sites *before* a
disaster.

The config itself was checked when it loaded (unknown VMs, dependencies outside the plan,
cycles, bad readiness or re-IP rules: exit 2). Here each plan meets the sites:

* the DR host answers, holds a replica of every VM with a defined, stopped standby;
* every network the standbys use, and the plan's DR and test networks, exist at the DR
  host (test networks must be isolated);
* the replicas are current: the newest restore point is younger than the RPO target;
* capacity: the plan's memory fits the DR host's free memory (and its vCPUs the host's
  declared ``vcpus`` × ``cpu_overcommit``);
* the source VMs exist (a warning only: the source site may be the one that is gone).

Findings are errors (the plan would fail) or warnings; exit 42 with any error.

``vmdr plan check`` includes the same checks, one line per problem
(:func:`plan_problems`): each plan is parsed on its own, so one broken plan is a problem
line naming it (not a config error stopping the whole check); ``--offline`` keeps to what
the config alone tells (unknown VMs, dependencies, cycles, bad mappings, a test network
that is a DR network), online adds the sites (DR host, replicas, networks, RPO, capacity).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from datetime import datetime

from vmdr.config import Config
from vmdr.errors import ConfigError, VmdrError
from vmdr.hypervisor import connect
from vmdr.jobs import failover_site as fs
from vmdr.jobs.failover import FAILOVER_STATE
from vmdr.jobs.replicate import redact_uri
from vmdr.plan import recovery
from vmdr.plan.inventory import Inventory
from vmdr.plan.recovery import RecoveryPlan
from vmdr.timeutil import utcnow


@dataclass
class Finding:
    plan: str
    severity: str  # error | warning
    check: str  # dr-host | replica | network | rpo | capacity | source | state
    message: str
    vm: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class PlanCheck:
    plan: str
    vms: int
    findings: list[Finding]
    memory_needed: dict[str, int]  # DR host -> bytes

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def check_plan(plan: RecoveryPlan, inv: Inventory, source_uri: str,
               now: datetime | None = None) -> PlanCheck:
    now = now or utcnow()
    out: list[Finding] = []

    def add(sev: str, check: str, msg: str, vm: str | None = None) -> None:
        out.append(Finding(plan.name, sev, check, msg, vm))

    memory: dict[str, int] = {}
    vcpus: dict[str, int] = {}
    with fs.Sites() as sites:
        for name in plan.order():
            pv = plan.vms[name]
            where = redact_uri(pv.to)
            try:
                vm = fs.load_vm(sites, pv)
            except VmdrError as exc:
                add("error", "dr-host" if exc.exit_code == 12 else "replica", exc.message,
                    name)
                continue
            info = vm.standby.info()
            memory[pv.to] = memory.get(pv.to, 0) + info.memory_kib * 1024
            vcpus[pv.to] = vcpus.get(pv.to, 0) + info.vcpus
            if vm.standby.is_active():
                failed_over = vm.site.read(f"{pv.directory}/{FAILOVER_STATE}") is not None
                add("warning" if failed_over else "error", "state",
                    f"the standby {vm.state.standby} runs at {where}"
                    + (" (failed over: `vmdr failback` when the source site is back)"
                       if failed_over else ": a replica cycle can't write under it"), name)
            if vm.state.writing:
                add("warning", "replica", "the last replica cycle was interrupted while "
                    "writing: a failover uses the newest restore point", name)
            newest = vm.state.newest
            target = plan.rpo_target(name)
            if newest is not None:
                age = (now - datetime.fromisoformat(newest.time)).total_seconds()
                if target is not None and age > target:
                    add("error", "rpo", f"the newest restore point is {age:.0f}s old, older "
                        f"than the RPO target {target:.0f}s: a planned failover would be "
                        "refused (check `vmdr replicate status`)", name)
            for nets, isolated, what in (
                    (vm.dr_networks(), False, "the standby's network"),
                    (sorted({plan.network_map[s] for s in vm.state.network_map
                             if s in plan.network_map}), False, "the plan's DR network"),
                    (sorted({plan.test_network_map[s] for s in vm.state.network_map
                             if s in plan.test_network_map}), True, "the plan's test network")):
                try:
                    fs.check_networks(vm, nets, isolated=isolated)
                except VmdrError as exc:
                    add("error", "network", f"{what}: {exc.message.split(': ', 1)[-1]}", name)
        for uri, need in memory.items():
            try:
                free = sites.hv(uri).free_memory()
            except VmdrError:
                free = None
            if free is not None and need > free:
                add("error", "capacity", f"the plan needs {need >> 20} MiB of memory at "
                    f"{redact_uri(uri)}, {free >> 20} MiB are free")
            host = next((h for h in inv.hosts.values() if h.uri == uri), None)
            if host is not None and host.vcpus is not None:
                limit = host.vcpus * inv.settings.cpu_overcommit
                if vcpus[uri] > limit:
                    add("error", "capacity", f"the plan needs {vcpus[uri]} vCPUs at "
                        f"{host.name}, which has {host.vcpus} (cpu_overcommit "
                        f"{inv.settings.cpu_overcommit:g})")
            if host is not None and host.memory is not None and need > host.memory:
                add("error", "capacity", f"the plan needs {need >> 20} MiB of memory at "
                    f"{host.name}, which has {host.memory >> 20} MiB")
    _sources(plan, source_uri, add)
    return PlanCheck(plan.name, len(plan.vms), out, memory)


def _sources(plan: RecoveryPlan, default: str, add: object) -> None:
    assert callable(add)
    by_uri: dict[str, list[str]] = {}
    for name in plan.order():
        by_uri.setdefault(plan.vms[name].source_uri or default, []).append(name)
    for uri, names in by_uri.items():
        try:
            hv = connect(uri)
        except VmdrError as exc:
            add("warning", "source", f"source host {redact_uri(uri)} unreachable "
                f"({exc.message}); the plan can still fail over (unplanned)")
            continue
        try:
            known = set(hv.list_domains())
            for n in names:
                if n not in known:
                    add("error", "source", f"no VM {n} at the source host {redact_uri(uri)}",
                        n)
        finally:
            hv.close()


# -- `vmdr plan check` ---------------------------------------------------------------------------


@dataclass
class PlanProblems:
    """What ``vmdr plan check`` reports of the recovery plans."""

    problems: list[str]  # one line each, ``recovery plan NAME: ...``
    config: Config  # the config without the plans that do not parse (for the rest)


def static_findings(plan: RecoveryPlan) -> list[str]:
    """Problems the config alone shows beyond what loading it refuses."""
    out = []
    for src, test in sorted(plan.test_network_map.items()):
        if plan.network_map.get(src) == test:
            out.append(f"network {src}: the test network {test} is its DR network: a test "
                       "failover would not be isolated")
    for i, r in enumerate(plan.reip_rules):
        for q in plan.reip_rules[:i]:
            if r.source.overlaps(q.source):
                out.append(f"re-IP rules {q.source} and {r.source} overlap (the first one "
                           "wins)")
    return out


def _finding_line(f: Finding) -> str:
    vm = f"{f.vm}: " if f.vm and not f.message.startswith(f"{f.vm}: ") else ""
    return f"recovery plan {f.plan}: {vm}{f.message}"


def plan_problems(cfg: Config, source_uri: str, offline: bool,
                  now: datetime | None = None) -> PlanProblems:
    """Every recovery plan's problems, one line each. A plan that does not parse is one
    line (and left out of the returned config); offline, only the config is read."""
    raw = cfg.raw.get(recovery.SECTION)
    if not isinstance(raw, dict) or not raw:
        return PlanProblems([], cfg)
    from vmdr.plan import inventory as invmod

    inv = invmod.from_config(cfg)  # a broken inventory stays a config error (exit 2)
    out: list[str] = []
    good: dict[str, object] = {}
    plans: list[RecoveryPlan] = []
    for name in sorted(raw):
        one = dataclasses.replace(cfg, raw={**cfg.raw, recovery.SECTION: {name: raw[name]}})
        try:
            plans += recovery.load_plans(one, inv).values()
        except ConfigError as exc:
            out.append(f"recovery plan {name}: {exc.message}")
            continue
        good[name] = raw[name]
    for plan in plans:
        out += [f"recovery plan {plan.name}: {m}" for m in static_findings(plan)]
        if not offline:
            chk = check_plan(plan, inv, source_uri, now)
            out += [_finding_line(f) for f in chk.findings if f.severity == "error"]
    rest = dataclasses.replace(cfg, raw={**cfg.raw, recovery.SECTION: good})
    if not good:
        rest.raw.pop(recovery.SECTION)
    return PlanProblems(out, rest)
