"""The hot site in the DR plan: replicas as coverage, recovery plans as run books.

A current replica at a DR host counts as a copy outside every blast radius that spares
that host: its RPO is the age of its newest restore point, its RTO the failover time
*measured* by the newest test or planned run of a recovery plan holding the VM (the
report's per-VM RTO), else an estimate (the boot time), marked as such. A replica that
does better than the repositories for a level replaces their figures there; the cell
notes it. Each recovery plan is written as a run book with its last test result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from vmdr.plan import coverage as covmod
from vmdr.plan.recovery import RecoveryPlan
from vmdr.plan.recovery_runs import RunReport, last_run
from vmdr.plan.units import fmt_duration


@dataclass(frozen=True)
class ReplicaFact:
    vm: str
    dr_host: str | None  # inventory host name of the DR host (None: not in the inventory)
    where: str  # for people: the DR host's URI without secrets
    newest: datetime | None  # the newest restore point's time
    error: str | None = None  # the replica's state could not be read


@dataclass
class HotSite:
    plans: list[RecoveryPlan] = field(default_factory=list)
    runs: dict[str, RunReport | None] = field(default_factory=dict)  # plan -> last test
    replicas: dict[str, ReplicaFact] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def measured_rto(vm: str, plans: list[RecoveryPlan], reports: str) -> tuple[float | None, str]:
    """The newest measured failover time of ``vm`` (test or planned run), and its source."""
    best: RunReport | None = None
    for p in plans:
        if vm not in p.vms:
            continue
        r = last_run(reports, p.name, ("test", "planned"))
        if r is not None and r.outcome == "passed" and (best is None or r.run > best.run):
            best = r
    if best is None:
        return None, "estimated"
    o = next((v for v in best.vms if v.vm == vm), None)
    if o is None or o.rto_s is None:
        return None, "estimated"
    return o.rto_s, f"measured by {best.kind} run {best.run}"


def last_tested(vm: str, plans: list[RecoveryPlan], reports: str) -> datetime | None:
    """When a test failover last brought ``vm`` up and found it ready: a boot verification
    of its replica."""
    times = []
    for p in plans:
        r = last_run(reports, p.name, ("test",)) if vm in p.vms else None
        if r is not None and any(v.vm == vm and v.outcome == "ready" for v in r.vms):
            times.append(datetime.fromisoformat(r.started))
    return max(times) if times else None


def apply(cov: covmod.Coverage, hs: HotSite, reports: str) -> None:
    """Count each VM's replica in its coverage (see the module docstring); a passed test
    failover counts as a boot verification of the VM."""
    cov.hotsite = hs
    inv = cov.inv
    for name, f in hs.replicas.items():
        vc = cov.vms.get(name)
        if vc is None or f.newest is None or f.dr_host is None or f.dr_host not in inv.hosts:
            continue
        tested = last_tested(name, hs.plans, reports)
        if tested is not None and (vc.last_verified is None or tested > vc.last_verified):
            vc.last_verified = tested
        age = max(0.0, (cov.now - f.newest).total_seconds())
        rto, how = measured_rto(name, hs.plans, reports)
        est = rto if rto is not None else vc.boot_s
        label = f"replica at {f.dr_host} (RTO {how})"
        rpo_t, rto_t = inv.rpo_target(vc.vm), inv.rto_target(vc.vm)
        for lc in vc.levels.values():
            if f.dr_host in lc.blast.hosts:
                continue
            if lc.covered and lc.rpo_s is not None and lc.rpo_s <= age:
                continue
            lc.covered, lc.rpo_s, lc.rto_estimate_s, lc.replica = True, age, est, label
            if tested is not None:
                lc.last_verified = tested
            lc.rpo_met = None if rpo_t is None else age <= rpo_t
            lc.rto_met = None if rto_t is None else est <= rto_t
            lc.gap = None if lc.rpo_met is not False else (
                f"{name}'s replica at {f.dr_host} is {fmt_duration(age)} old (RPO target "
                f"{fmt_duration(rpo_t)}): check `vmdr replicate status {name}`")
            lc.unknown = False
        vc.problems = covmod.vm_problems(inv, vc, [c for r in cov.repos.values()
                                                   for c in r.copies if c.vm == name],
                                         cov.now)


def markdown(hs: HotSite) -> list[str]:
    """The recovery plans as run books (a section of the written plan)."""
    if not hs.plans:
        return []
    out = ["## Hot site: recovery plans", "",
           "Each plan brings a whole application up at the DR site from its replicas, "
           "group by group. Check it first (`vmdr recovery check PLAN`), then:", "",
           "- the source site is still up (planned move, no data loss): "
           "`vmdr failover PLAN --planned`;",
           "- the source site is gone: `vmdr failover PLAN` (newest restore point; "
           "`--point TIME` for an older one);",
           "- back home when the source site is repaired: `vmdr failback PLAN`;",
           "- rehearsal, production untouched: `vmdr failover PLAN --test`.", ""]
    for p in hs.plans:
        r = hs.runs.get(p.name)
        out += [f"### Recovery plan {p.name}", ""]
        if p.description:
            out += [p.description, ""]
        if r is None:
            out += ["**Last test: never.** Run `vmdr failover " + p.name + " --test`.", ""]
        else:
            rto = f", RTO {fmt_duration(r.rto_s)}" if r.rto_s is not None else ""
            out += [f"**Last test:** {r.started} — {r.outcome}{rto} (report `{r.run}`).", ""]
        for g in p.groups:
            out.append(f"{g.number}. Group {g.number}: start {', '.join(g.vms)}; ready when "
                       f"`{g.ready}` (at most {fmt_duration(g.timeout_s)})"
                       + (f", then wait {fmt_duration(g.delay_s)}" if g.delay_s else "")
                       + "".join(f"; before: `{s}`" for s in g.pre)
                       + "".join(f"; after: `{s}`" for s in g.post) + ".")
        where = sorted({v.host or v.to for v in p.vms.values()})
        out += ["", f"DR host(s): {', '.join(where)}."]
        for vm in p.order():
            f = hs.replicas.get(vm)
            if f is None:
                continue
            state = (f"newest restore point {f.newest.isoformat(timespec='seconds')}"
                     if f.newest else f"state unknown ({f.error})" if f.error
                     else "no restore point yet")
            out.append(f"- {vm}: replica at {f.where}, {state}.")
        out.append("")
    out += [f"- {n}" for n in hs.notes] + ([""] if hs.notes else [])
    return out
