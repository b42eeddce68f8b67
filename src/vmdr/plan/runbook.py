"""The written plan as data, structured like a NIST SP 800-34 contingency plan.

Scenarios are concrete disasters: for every level from *host* upward and every host with
VMs, the blast radius around that host; levels and hosts with the same blast radius (same
hosts and repositories lost) are one scenario. Each scenario restores the affected VMs in
boot-order groups, dependencies first, from the copy coverage picked, onto surviving hosts
with room (first-fit by memory). Timing model: restores onto one target host run one after
another, different hosts in parallel; a VM boots once its restore is done and its
dependencies and every earlier boot group are up.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vmdr.plan import capacity, taxonomy
from vmdr.plan.coverage import Blast, Coverage, blast_radius, choose, rto_of
from vmdr.plan.history import Copy, Verification
from vmdr.plan.inventory import Inventory, boot_order
from vmdr.plan.units import fmt_duration
from vmdr.storage.registry import redact


@dataclass
class Step:
    vm: str
    boot_group: int
    depends_on: tuple[str, ...]
    owner: str
    copy: Copy | None
    repo_url: str | None
    target: str | None  # host name
    command: str | None
    retrieval_s: float = 0.0
    restore_s: float = 0.0
    boot_s: float = 0.0
    start_s: float = 0.0  # from the start of recovery
    up_s: float = 0.0
    problem: str | None = None
    ha: str | None = None  # HA restarts it by itself (what from): no manual restore


@dataclass
class Task:
    id: str
    title: str
    owner: str
    depends: list[str]
    duration_s: float | None = None
    command: str | None = None


@dataclass
class Scenario:
    id: str
    title: str
    levels: list[str]
    blast: Blast
    steps: list[Step]
    tasks: list[Task] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return max((s.up_s for s in self.steps), default=0.0)

    @property
    def problems(self) -> list[str]:
        return [f"{s.vm}: {s.problem}" for s in self.steps if s.problem]


@dataclass
class TestRecord:
    vm: str
    last: Verification | None
    last_passed: datetime | None
    copy: str | None  # "repo:snapshot" of the last verification
    next_due: datetime | None
    overdue: bool


@dataclass
class Plan:
    coverage: Coverage
    generated: datetime
    scenarios: list[Scenario]
    tests: list[TestRecord]
    gaps: list[str]

    @property
    def inv(self) -> Inventory:
        return self.coverage.inv


def _owner(inv: Inventory, vm: str) -> str:
    role = inv.restorer(vm)
    if role:
        return role.title
    return inv.vms[vm].owner or "(unassigned)"


def restore_command(inv: Inventory, copy: Copy, host: str | None, vm: str) -> str:
    decl = inv.repositories[copy.repo]
    h = inv.hosts.get(host or "")
    uri = (h.uri if h and h.uri else f"qemu+ssh://root@{host or 'REPLACEMENT-HOST'}/system")
    target_dir = inv.vms[vm].target_dir or (h.target_dir if h else "/var/lib/libvirt/images")
    parts = ["vmdr", "restore", f"{vm}@{copy.snapshot[:12]}", "--repo", redact(decl.url)]
    if decl.url.startswith("tape:"):
        # tapes: first back into a scratch repository (vmdr tape restore), then restore
        key = decl.key_file or "KEY-FILE"
        pre = ["vmdr", "tape", "restore", f"{vm}@{copy.snapshot[:12]}", "--to",
               "/var/tmp/vmdr-from-tape", "--key-file", key]
        parts = ["vmdr", "restore", f"{vm}@{copy.snapshot[:12]}", "--repo",
                 "/var/tmp/vmdr-from-tape", "--key-file", key, "--target-dir", target_dir,
                 "--define", "--start", "--connect", uri]
        return " ".join(shlex.quote(p) for p in pre) + " && " + " ".join(
            shlex.quote(p) for p in parts)
    if decl.password_file:
        parts += ["--password-file", decl.password_file]
    if decl.key_file:
        parts += ["--key-file", decl.key_file]
    parts += ["--target-dir", target_dir, "--define", "--start", "--connect", uri]
    return " ".join(shlex.quote(p) for p in parts)


def _ha_step(cov: Coverage, step: Step, copy: Copy | None) -> None:
    """An HA VM covered at the host level (vmdr.plan.hafacts): the leader restarts it on a
    survivor by itself — from its shared storage, or (``ha_storage = "local"``) from its
    replica on a surviving host or its newest backup by instant restore, losing the
    writes since then."""
    vc, vm = cov.vms[step.vm], cov.inv.vms[step.vm]
    lc = vc.levels.get("host")
    if lc is None or not lc.ha:
        return
    rto = lc.rto_estimate_s if lc.rto_estimate_s is not None else vc.boot_s
    if vm.ha_storage != "local":
        step.ha = "HA restarts it on a survivor from its shared storage (no data lost)"
    else:
        src = (f"its newest backup ({copy.repo} snapshot {copy.short_id} now)" if copy
               else "its newest backup")
        rep = cov.inv.replicas.get(step.vm)
        if rep is not None and rep.to in cov.inv.hosts and rep.to != vc.host:
            src = f"its replica on {rep.to} (else {src})"
        age = f" ≈ {fmt_duration(lc.rpo_s)} now" if lc.rpo_s is not None else ""
        how = "" if rep is not None and src.startswith("its replica") \
            else ", by instant restore"
        step.ha = (f"HA restarts it on a survivor from {src}{how} (RPO = the age of that "
                   f"restore point{age})")
    step.command, step.problem = None, None
    step.retrieval_s, step.restore_s, step.boot_s = 0.0, 0.0, rto


def _steps(cov: Coverage, names: list[str], blast: Blast, in_place: bool,
           ha: bool = False) -> list[Step]:
    inv = cov.inv
    survivors = [h for h in sorted(inv.hosts) if h not in blast.hosts]
    needs = {n: cov.vms[n].need for n in cov.vms}
    free, _unknown = capacity.free_capacity(inv, needs, survivors)
    for h in survivors:  # hosts of unknown capacity still take VMs, last
        free.setdefault(h, capacity.Free(h, 0.0, 0))
    placement, _left = capacity.place([needs[n] for n in names], free)
    steps: list[Step] = []
    host_free: dict[str, float] = {}
    up: dict[str, float] = {}
    group_up: dict[int, float] = {}
    for name in boot_order(inv, names):
        vc, vm = cov.vms[name], inv.vms[name]
        alive = sorted((c for r in cov.repos.values() for c in r.copies
                        if c.vm == name and c.repo not in blast.repos),
                       key=lambda c: c.time, reverse=True)
        copy, _rto = choose(inv, alive, inv.rpo_target(vm), cov.throughput, vc.boot_s, cov.now)
        target = vc.host if in_place else placement.get(name)
        step = Step(name, vm.boot_group, vm.depends_on, _owner(inv, name), copy, None, target,
                    None, boot_s=vc.boot_s)
        if copy is None:
            step.problem = f"no copy survives ({blast.label}): nothing to restore from"
        else:
            decl = inv.repositories[copy.repo]
            step.repo_url = redact(decl.url)
            step.retrieval_s = inv.vaults[decl.vault].retrieval_s if decl.vault else 0.0
            total = rto_of(inv, decl, copy, cov.throughput[copy.repo][0], vc.boot_s)
            step.restore_s = total - step.retrieval_s - vc.boot_s
            step.command = restore_command(inv, copy, target, name)
        if ha and survivors:
            _ha_step(cov, step, copy)
        if target is None and step.ha is None:
            step.problem = (step.problem or "") + ("; " if step.problem else "") + (
                "no surviving host has room for it: provide a replacement host"
                if survivors else "no host survives: provide a replacement host")
        t_host = target or "REPLACEMENT-HOST"
        restored = host_free.get(t_host, 0.0) + step.retrieval_s + step.restore_s
        host_free[t_host] = restored
        earlier = max((t for g, t in group_up.items() if g < vm.boot_group), default=0.0)
        deps = max((up.get(d, 0.0) for d in vm.depends_on), default=0.0)
        step.start_s = max(restored, earlier, deps)
        step.up_s = step.start_s + step.boot_s
        up[name] = step.up_s
        group_up[vm.boot_group] = max(group_up.get(vm.boot_group, 0.0), step.up_s)
        steps.append(step)
    return steps


def _tasks(inv: Inventory, sc: Scenario) -> list[Task]:
    lead = ", ".join(r.title for r in inv.declarers()) or "(no role declares: add one)"
    crit = " / ".join(taxonomy.level(k).activation for k in sc.levels[:1])
    tasks = [Task("T1", f"Declare the disaster: {sc.title}. Criteria: {crit}", lead, []),
             Task("T2", "Notify the owners and contacts of the affected VMs", lead, ["T1"])]
    repos = sorted({s.copy.repo for s in sc.steps if s.copy})
    check_task: dict[str, str] = {}
    for i, r in enumerate(repos, 1):
        decl = inv.repositories[r]
        tid = f"T3.{i}"
        restorers = sorted({s.owner for s in sc.steps if s.copy and s.copy.repo == r})
        if decl.vault:
            vault = inv.vaults[decl.vault]
            tasks.append(Task(f"{tid}a", f"Retrieve the tapes of {r} from vault {vault.name} "
                              f"({inv.label(vault.location)})", ", ".join(restorers), ["T1"],
                              vault.retrieval_s))
        cmd = (f"vmdr tape catalog --rebuild --key-file {shlex.quote(decl.key_file or 'KEY-FILE')}"
               if decl.url.startswith("tape:") else
               f"vmdr snapshots --repo {shlex.quote(redact(decl.url))}") + (
            f" --password-file {shlex.quote(decl.password_file)}" if decl.password_file else "")
        tasks.append(Task(tid, f"Check that repository {r} opens and lists the snapshots",
                          ", ".join(restorers),
                          [f"{tid}a"] if decl.vault else ["T1"], None, cmd))
        check_task[r] = tid
    ids: dict[str, str] = {}
    for n, s in enumerate(sc.steps, 1):
        ids[s.vm] = f"R{n}"
    groups = sorted({s.boot_group for s in sc.steps})
    for s in sc.steps:
        deps = [check_task[s.copy.repo]] if s.copy else ["T1"]
        deps += [ids[d] for d in s.depends_on if d in ids]
        i = groups.index(s.boot_group)
        if i:  # the whole previous boot group is up first
            deps += [ids[o.vm] for o in sc.steps
                     if o.boot_group == groups[i - 1] and ids[o.vm] not in deps]
        where = f"on {s.target}" if s.target else "on a replacement host"
        if s.ha:
            tasks.append(Task(ids[s.vm], f"Check that HA restarted {s.vm} (`vmdr ha events "
                              f"--vm {s.vm}`): {s.ha}", s.owner, ["T1"], s.boot_s))
            continue
        tasks.append(Task(ids[s.vm], f"Restore and boot {s.vm} {where} (boot group "
                          f"{s.boot_group})", s.owner, deps,
                          s.retrieval_s + s.restore_s + s.boot_s, s.command))
    for s in sc.steps:
        owner = inv.vms[s.vm].owner or s.owner
        tasks.append(Task(f"V{ids[s.vm][1:]}", f"Validate {s.vm}: heartbeat seen, application "
                          "checks by its owner, dependencies answer", owner, [ids[s.vm]]))
    tasks.append(Task("Z1", "Reconstitution: back up the restored VMs and re-establish "
                      "copies outside the new blast radius; run `vmdr plan check`", lead,
                      [t.id for t in tasks if t.id.startswith("V")]))
    return tasks


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def scenarios(cov: Coverage) -> list[Scenario]:
    inv = cov.inv
    placed = {n: v.host for n, v in cov.vms.items()}
    seen: dict[tuple[frozenset[str], frozenset[str]], Scenario] = {}
    out: list[Scenario] = []
    in_place = Scenario("S0", "A single VM or application fails", ["application", "vm"],
                        Blast("the failed VM only", None, frozenset(), frozenset()), [])
    in_place.steps = _steps(cov, sorted(cov.vms), in_place.blast, in_place=True)
    out.append(in_place)
    for level in taxonomy.LEVELS:
        if level.scope == "vm":
            continue
        for host in sorted({h for h in placed.values() if h}):
            any_vm = next(n for n, h in placed.items() if h == host)
            blast = blast_radius(inv, level, any_vm, host)
            key = (blast.hosts, blast.repos)
            if key in seen:
                sc = seen[key]
                if level.key not in sc.levels:
                    sc.levels.append(level.key)
                    if blast.label not in sc.labels:
                        sc.labels.append(blast.label)
                        sc.title = f"{_cap(' / '.join(sc.labels))} lost"
                continue
            names = sorted(n for n, h in placed.items() if h in blast.hosts)
            sc = Scenario(f"S{len(out)}", f"{_cap(blast.label)} lost", [level.key], blast,
                          _steps(cov, names, blast, in_place=False,
                                 ha=level.key == "host" and len(blast.hosts) == 1),
                          labels=[blast.label])
            seen[key] = sc
            out.append(sc)
    for sc in out:
        sc.tasks = _tasks(inv, sc)
    return out


def _tests(cov: Coverage) -> list[TestRecord]:
    out = []
    interval = timedelta(seconds=cov.inv.settings.test_interval_s)
    for name, vc in sorted(cov.vms.items()):
        recs = sorted(((v, c) for r in cov.repos.values() for c in r.copies if c.vm == name
                       for v in c.verifications if v.boot), key=lambda x: x[0].time)
        last = recs[-1] if recs else None
        due = vc.last_verified + interval if vc.last_verified else None
        out.append(TestRecord(name, last[0] if last else None, vc.last_verified,
                              f"{last[1].repo}:{last[1].short_id}" if last else None, due,
                              due is None or due < cov.now))
    return out


def gaps(cov: Coverage) -> list[str]:
    out: list[str] = []
    for vc in cov.vms.values():
        for lc in vc.levels.values():
            if lc.gap and lc.required:
                out.append(lc.gap)
        if not vc.rule.ok:
            out.append(f"{vc.vm.name} does not meet 3-2-1-1-0: {'; '.join(vc.rule.missing())}")
    out += [h.problem for h in cov.n1 if h.problem]
    for vc in cov.vms.values():
        out += [p for p in vc.problems if "verification" in p or "inventory" in p]
    out += [p for p in cov.problems() if p.startswith("repository ")]
    optional = sorted({lc.gap.split(":")[0] for vc in cov.vms.values()
                       for lc in vc.levels.values() if lc.gap and not lc.required})
    out += [f"(not required) {g}" for g in optional]
    if not cov.inv.declarers():
        out.append("no role may declare a disaster: set declares = true on a [roles.NAME]")
    return list(dict.fromkeys(out))


def build(cov: Coverage) -> Plan:
    return Plan(cov, cov.now, scenarios(cov), _tests(cov), gaps(cov))


def duration(s: float | None) -> str:
    return fmt_duration(s)
