"""Boot order after a failover: priority groups, dependencies and readiness, as data.

A plan is a list of stages. Stage order: priority group (the inventory's ``boot_group``,
lower first), then dependency depth inside the group. A VM starts when every VM it waits
for is *ready*: its readiness check passed, plus that VM's delay (vSphere 6.5+
orchestration, SRM priority groups). A VM waits for every VM of earlier priority groups
in the same failover and for its own dependencies. If one of those never gets ready, its
``ready_timeout`` after its start releases the waiters (the event says so); a dependency
that is not being restarted at all (not under HA, or not placed) is reported and not
waited for.

:func:`due` is the executor's decision — which starts are due at ``now`` — so the agent
holds no ordering logic of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmdr.ha.model import ClusterState, HAPolicy, Readiness

__all__ = ["Start", "boot_plan", "due"]


@dataclass(frozen=True)
class Start:
    vm: str
    host: str
    priority: int
    stage: int
    after: tuple[str, ...]  # VMs that must be ready (or timed out) first
    ready: Readiness
    missing: tuple[str, ...] = ()  # dependencies not running and not being restarted


def boot_plan(policy: HAPolicy, state: ClusterState, placed: dict[str, str]) -> list[Start]:
    """The starts of a failover, in stage order (then by name)."""
    depth: dict[str, int] = {}

    def d(name: str) -> int:
        if name not in depth:
            depth[name] = 0
            same = [x for x in policy.vms[name].depends_on
                    if x in placed and policy.vms[x].priority == policy.vms[name].priority]
            depth[name] = 1 + max((d(x) for x in same), default=-1)
        return depth[name]

    keys = sorted({(policy.vms[n].priority, d(n)) for n in placed})
    stage_of = {k: i for i, k in enumerate(keys)}
    starts = []
    for name in sorted(placed, key=lambda n: (policy.vms[n].priority, d(n), n)):
        rule = policy.vms[name]
        earlier = [x for x in placed if policy.vms[x].priority < rule.priority]
        deps = [x for x in rule.depends_on if x in placed]
        missing = tuple(x for x in rule.depends_on if x not in placed
                        and not (x in state.vms and state.vms[x].running))
        starts.append(Start(name, placed[name], rule.priority,
                            stage_of[(rule.priority, d(name))],
                            tuple(sorted(set(earlier) | set(deps))), rule.ready, missing))
    return starts


def due(plan: list[Start], *, now: float, started: dict[str, float],
        ready_at: dict[str, float]) -> list[Start]:
    """Starts due at ``now``: not started yet, and every VM in ``after`` is ready since at
    least its delay (``ready_at``: when its check first passed), or was started at least
    its ``ready_timeout`` ago."""
    by_name = {s.vm: s for s in plan}
    out = []
    for s in plan:
        if s.vm in started:
            continue
        ok = True
        for dep in s.after:
            r = by_name[dep].ready
            if dep in ready_at and now >= ready_at[dep] + r.delay:
                continue
            if dep in started and now >= started[dep] + r.timeout:
                continue
            ok = False
            break
        if ok:
            out.append(s)
    return out
