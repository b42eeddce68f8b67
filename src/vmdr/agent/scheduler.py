"""Policies → jobs: when each is due, which VMs it covers, and which queued job may start.

Everything here is a function of (policies, VMs, schedule state, running jobs, ``now``);
the daemon supplies them and carries out the result.

Catch-up (anacron-style): each schedule keeps the last calendar time it handled. When the
next occurrence after it is already past — the agent was down, or this is the tick that
crossed it — the schedule fires **once** and its state moves to ``now``: three missed
nightly runs make one run, not three. A schedule seen for the first time starts at ``now``.
The state moves by compare-and-set, so two agents (a fleet's old and new leader) cannot
both fire the same occurrence.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from vmdr.agent import calendar
from vmdr.agent.history import Job
from vmdr.config import Config, PolicyConfig, parse_duration
from vmdr.errors import ConfigError, UsageError
from vmdr.storage.throttle import Windows


@dataclass(frozen=True)
class VMInfo:
    name: str
    host: str
    running: bool = True
    tier: str | None = None


@dataclass(frozen=True)
class Schedule:
    key: str  # "policy:kind", the schedule_state key
    policy: str
    kind: str  # backup | verify | prune | replicate
    event: calendar.CalendarEvent


@dataclass
class Firing:
    schedule: Schedule
    due: float  # the calendar time that elapsed (the newest one missed, when catching up)
    previous: float | None  # the state it replaces (for compare-and-set)
    catch_up: bool = False


def schedules(cfg: Config) -> list[Schedule]:
    """Every schedule of every policy (CalendarError, exit 2, for a bad one)."""
    out = []
    for name, p in sorted(cfg.policies.items()):
        if p.kind == "replicate":  # replica cycles or supervised mirrors: nothing else
            out.append(Schedule(f"{name}:replicate", name, "replicate",
                                _parse(p, "schedule", p.schedule)))
            if p.bandwidth:
                bandwidth(p)
            continue
        out.append(Schedule(f"{name}:backup", name, "backup", _parse(p, "schedule", p.schedule)))
        if p.keep or p.keep_within:
            out.append(Schedule(f"{name}:prune", name, "prune",
                                _parse(p, "prune_schedule", p.prune_schedule)))
        if p.verify_schedule:
            out.append(Schedule(f"{name}:verify", name, "verify",
                                _parse(p, "verify", p.verify_schedule)))
        if p.bandwidth:
            bandwidth(p)
    return out


def bandwidth(p: PolicyConfig) -> Windows:
    """The policy's bandwidth windows (ConfigError, exit 2, for a bad rule). Its backup,
    copy and replicate jobs get them as ``--bwlimit`` and follow them by the clock as they
    run (a mirror: its block jobs' speed)."""
    try:
        return Windows(p.bandwidth)
    except UsageError as exc:
        raise ConfigError(f"policies.{p.name}.bandwidth: {exc}") from None


def _parse(p: PolicyConfig, key: str, text: str) -> calendar.CalendarEvent:
    try:
        return calendar.parse(text)
    except calendar.CalendarError as exc:
        raise calendar.CalendarError(f"policies.{p.name}.{key}: {exc.message}") from None


def due(scheds: Iterable[Schedule], state: dict[str, float], now: dt.datetime) -> list[Firing]:
    """The schedules that fire at *now* given their *state* (last handled time)."""
    out = []
    ts = now.timestamp()
    for s in scheds:
        last = state.get(s.key)
        if last is None:
            continue  # first sight: the daemon records now, no catch-up
        nxt = s.event.next_after(dt.datetime.fromtimestamp(last, now.tzinfo))
        if nxt is None or nxt > now:
            continue
        # the newest occurrence <= now is what this run stands for
        newest, probe = nxt, s.event.next_after(nxt)
        catch_up = probe is not None and probe <= now
        if catch_up:
            newest = _newest_before(s.event, nxt, now)
        out.append(Firing(s, newest.timestamp(), last, catch_up or (ts - nxt.timestamp()) > 60))
    return out


def _newest_before(ev: calendar.CalendarEvent, start: dt.datetime,
                   now: dt.datetime) -> dt.datetime:
    """The last occurrence in [start, now], stepping back from now in growing windows."""
    span = dt.timedelta(minutes=2)
    while True:
        lo = max(start, now - span)
        t = ev.next_after(lo - dt.timedelta(seconds=1))
        best = None
        while t is not None and t <= now:
            best, t = t, ev.next_after(t)
        if best is not None:
            return best
        span *= 8


def interval(ev: calendar.CalendarEvent, now: dt.datetime) -> float:
    """The gap between the next two occurrences: the schedule's nominal period."""
    a = ev.next_after(now)
    b = ev.next_after(a) if a else None
    return (b - a).total_seconds() if a and b else 86400.0


def covered(policy: PolicyConfig, vm: VMInfo) -> bool:
    if not any(fnmatch.fnmatchcase(vm.name, g) for g in policy.vms):
        return False
    if policy.tiers and vm.tier not in policy.tiers:
        return False
    return not policy.hosts or any(fnmatch.fnmatchcase(vm.host, h) for h in policy.hosts)


def policy_of(cfg: Config, vm: VMInfo) -> PolicyConfig | None:
    """The first policy (by name) that covers *vm*."""
    for _, p in sorted(cfg.policies.items()):
        if covered(p, vm):
            return p
    return None


def jitter(seconds: float, *key: str) -> float:
    """A stable offset in [0, seconds) for *key*: spreads starts, same on every agent."""
    if seconds <= 0:
        return 0.0
    h = int.from_bytes(hashlib.sha256("\0".join(key).encode()).digest()[:8], "big")
    return (h % int(seconds * 1000)) / 1000.0


@dataclass
class JobSpec:
    type: str
    vm: str | None
    repository: str
    policy: str
    host: str | None
    not_before: float
    args: dict[str, object] = field(default_factory=dict)


def expand(cfg: Config, f: Firing, vms: Iterable[VMInfo], default_host: str) -> list[JobSpec]:
    """The jobs a firing stands for."""
    p = cfg.policies[f.schedule.policy]
    spread = p.jitter_s if p.jitter_s is not None else cfg.agent.jitter_s
    if f.schedule.kind == "prune":
        return [JobSpec("prune", None, p.repository, p.name, default_host, f.due,
                        {"keep": dict(p.keep), "keep_within": p.keep_within})]
    out = []
    for vm in sorted(vms, key=lambda v: v.name):
        if not covered(p, vm):
            continue
        start = f.due + jitter(spread, p.name, vm.name, str(f.due))
        if f.schedule.kind == "replicate":
            # a mirror job runs until it fails: the next firing queues its restart (one
            # job per VM at a time, queued ones coalesce)
            out.append(JobSpec("replicate", vm.name, p.repository, p.name, vm.host, start,
                               {"mode": p.mode, "to": p.to, "rpo": p.rpo_s}))
        elif f.schedule.kind == "backup":
            out.append(JobSpec("backup", vm.name, p.repository, p.name, vm.host, start,
                               {"mode": p.mode, "copy": list(p.copy)}))
        else:
            out.append(JobSpec("verify", vm.name, p.repository, p.name, vm.host, start,
                               {"boot": p.verify_boot}))
    return out


MIRROR_MODES = ("mirror", "sync")


def is_mirror(j: Job) -> bool:
    """A supervised mirror: a replicate job that runs as long as its mirror does."""
    return j.type == "replicate" and str(j.args.get("mode") or "") in MIRROR_MODES


def startable(queued: list[Job], running: list[Job], now: float, max_jobs: int,
              repository_jobs: int, max_mirrors: int = 8) -> list[Job]:
    """Queued jobs that may start now, oldest first: their time has come, the host and the
    repository are under their limits, and their VM has no job running (one job per VM).
    Supervised mirrors run for days: they have their own limit (``max_mirrors``) and take
    none of the ``max_jobs`` slots of backups, copies and replica cycles."""
    busy_vms = {j.vm for j in running if j.vm}
    per_repo = Counter(j.repository for j in running if j.type != "replicate")
    slots = max_jobs - sum(1 for j in running if not is_mirror(j))
    mirror_slots = max_mirrors - sum(1 for j in running if is_mirror(j))
    out: list[Job] = []
    for j in sorted(queued, key=lambda j: (float(str(j.args.get("not_before", j.created))),
                                           j.created)):
        if slots <= 0 and mirror_slots <= 0:
            break
        mirror = is_mirror(j)
        if (mirror_slots if mirror else slots) <= 0:
            continue
        if float(str(j.args.get("not_before", j.created))) > now:
            continue
        if j.vm and j.vm in busy_vms:
            continue
        if j.type != "replicate" and per_repo[j.repository] >= repository_jobs:
            continue  # replicas read the VM, not a repository
        out.append(j)
        if mirror:
            mirror_slots -= 1
        else:
            slots -= 1
        per_repo[j.repository] += 1
        if j.vm:
            busy_vms.add(j.vm)
    return out


def rpo_target(cfg: Config, vm: VMInfo, policy: PolicyConfig, now: dt.datetime) -> float:
    """The RPO a VM must meet: the policy's ``rpo``, the VM's or its tier's ``rpo`` in the
    inventory, else twice the backup schedule's period."""
    for src in (policy.rpo_s, vm_rpo(cfg, vm)):
        if src is not None:
            return src
    return 2 * interval(calendar.parse(policy.schedule), now)


def vm_rpo(cfg: Config, vm: VMInfo) -> float | None:
    """The VM's own ``rpo``, or its tier's, from the inventory."""
    raw = cfg.vm(vm.name).extra.get("rpo")
    if raw is None and vm.tier:
        plan = cfg.raw.get("plan")
        tiers = plan.get("tiers", {}) if isinstance(plan, dict) else {}
        t = tiers.get(vm.tier) if isinstance(tiers, dict) else None
        raw = t.get("rpo") if isinstance(t, dict) else None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    return parse_duration(raw) if isinstance(raw, str) else None
