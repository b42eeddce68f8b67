"""The boot-order judge of bench/ha.py: priority groups and dependencies against the real
start and heartbeat times of one failover trial.

The bench polls libvirt on every host and each guest's console every ~0.1 s after the
failure. ``starts[vm]`` is the first poll that saw *vm* running on a survivor, ``beats[vm]``
the first poll that saw a heartbeat of that new boot on its console. A VM *v* waits for
every restarted VM of an earlier priority group and for its own dependencies; for each such
*u*, ``starts[v] >= beats[u] + delay(u) - tolerance`` must hold.

Why not the leader's events (the check before): they are the leader's own account, stamped
with its clock, and they miss valid orders — a start whose libvirt call timed out but
which ran is found running on the retry and gets no ``started`` event; a trial whose
guests were not up within the bench's window (a stall, a separate finding) has no events
at all — and they cannot see a leader that thinks a guest is ready earlier than it was.

``tolerance`` covers the two polls (a start seen up to one poll late only helps; a
heartbeat seen one poll late hurts) and the guest-agent answering a little before the
first console heartbeat (the leader checks the agent, the bench reads the console). A
released waiter, the misses this check exists for, starts seconds early: the guest boots
in ~7 s under TCG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Rule", "Verdict", "judge_order", "leader_events_order"]

TOLERANCE_S = 0.5


@dataclass(frozen=True)
class Rule:
    priority: int  # the boot_group: lower first
    depends_on: tuple[str, ...] = ()
    delay: float = 0.0  # its readiness delay: its waiters start heartbeat + delay later


@dataclass
class Verdict:
    """``ok`` True/False, or None when the trial is incomplete (a VM was never restarted
    within the window: a stall, reported apart from order misses)."""

    ok: bool | None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems}


def waits_for(rules: Mapping[str, Rule], vm: str) -> list[str]:
    r = rules[vm]
    return sorted({u for u, ru in rules.items() if ru.priority < r.priority}
                  | {u for u in r.depends_on if u in rules})


def judge_order(rules: Mapping[str, Rule], starts: Mapping[str, float],
                beats: Mapping[str, float], *,
                tolerance: float = TOLERANCE_S) -> Verdict:
    """Judge one trial in which every VM of ``rules`` was to be restarted."""
    problems: list[str] = []
    missing = sorted(set(rules) - set(starts))
    for v in sorted(starts):
        if v not in rules:
            continue
        for u in waits_for(rules, v):
            if u not in beats:
                problems.append(f"{v} started at +{starts[v]:.2f} but {u} (which it waits "
                                "for) had no heartbeat")
                continue
            due = beats[u] + rules[u].delay
            if starts[v] < due - tolerance:
                problems.append(f"{v} started {due - starts[v]:.2f}s before {u}'s heartbeat "
                                f"+ {rules[u].delay:g}s")
    if problems:
        return Verdict(False, problems)
    if missing:
        return Verdict(None, [f"{', '.join(missing)} not restarted within the window"])
    return Verdict(True)


def leader_events_order(events: list[dict[str, Any]], first: str, then: str,
                        delay: float, since: float) -> bool:
    """The check the bench used before (kept to compare, not to judge): the leader's first
    ``ready`` event of *first* and its first ``started`` event of *then*."""
    evs = [e for e in events if e["time"] >= since]
    rd = [e["time"] for e in evs if e["kind"] == "ready" and e["vm"] == first]
    sa = [e["time"] for e in evs if e["kind"] == "started" and e["vm"] == then]
    return bool(rd and sa and sa[0] >= rd[0] + delay)
