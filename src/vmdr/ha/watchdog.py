"""Watchdog decisions for one VM on one host, as pure functions (Patroni style).

Each cycle the monitor (:mod:`.monitor`) *observes* a VM (its state and reason, the
lifecycle events since the last cycle, the guest agent's answer, the application checks
that were due), folds that into the VM's :class:`Track` (:func:`note`), asks
:func:`decide` for **one** decision, carries it out, and records it with its reason.

The order of concerns, first match wins:

1. stopped: a crash (event ``crashed``, ``stopped/crashed``, ``stopped/failed``, or
   state reason crashed/failed/panicked) → ``start``; a shutdown someone asked for
   (guest shutdown, ``virsh destroy``, save) is left alone, like vSphere HA leaves a guest
   OS shutdown alone;
2. paused on an I/O error → ``resume`` (if the storage is still gone it pauses again and
   the budget runs out: the HA layer then restarts it on a host that reaches its disks);
   paused for any other reason (an operator, a migration) is not a hang: left alone;
3. running, and the agent, which had answered since the last start, has been silent for
   ``hang_timeout``; or the agent never answered within ``min_uptime`` after *our* reset
   → ``reset`` or ``restart`` (settings.action);
4. an application check failed ``failures`` times in a row → ``app-restart``; once its
   ``restarts`` restarts within the window did not hold (or it has no restart command)
   → the VM level (``reset``/``restart``).

Every VM-level action (start, resume, reset, restart) spends one unit of the restart
budget (``restart_budget`` per ``restart_window``). A VM whose budget is spent is
``escalate``\\ d once (to the HA layer: restart on another host) or ``alert``\\ ed, and left
alone until it has been seen healthy again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .appcheck import CheckResult
from .ports import EventPort
from .wdsettings import WatchdogSettings

__all__ = ["Action", "Decision", "Observation", "Track", "decide", "note"]

Action = Literal["none", "start", "resume", "reset", "restart", "app-restart", "escalate",
                 "alert"]
VM_ACTIONS = ("start", "resume", "reset", "restart")
CRASH_REASONS = ("crashed", "failed", "panicked")


@dataclass(frozen=True)
class Observation:
    """What one cycle saw of one VM. ``state`` is running | paused | stopped | other |
    missing (not defined on this host)."""

    now: float
    state: str
    reason: str = ""
    events: tuple[EventPort, ...] = ()
    heartbeat: bool | None = None  # the agent answered (None: not asked this cycle)
    checks: tuple[CheckResult, ...] = ()


@dataclass
class AppTrack:
    failures: int = 0  # consecutive
    restarts: list[float] = field(default_factory=list)
    last_run: float | None = None
    last_detail: str = ""


@dataclass
class Track:
    """What the watchdog remembers of one VM between cycles."""

    since: float  # watched since, or (re)started since
    last_ping: float | None = None
    last_heartbeat: float | None = None
    armed: bool = False  # the agent answered since the last (re)start
    ours: bool = False  # the last (re)start was the watchdog's
    actions: list[float] = field(default_factory=list)  # VM-level actions (the budget)
    escalated: bool = False
    last_problem: str | None = None  # for "detected" of things left alone, once each
    apps: dict[str, AppTrack] = field(default_factory=dict)

    def recent(self, now: float, window: float) -> list[float]:
        return [t for t in self.actions if now - t < window]


@dataclass(frozen=True)
class Decision:
    action: Action
    problem: str | None  # crashed | io-error | hung | app-failed | stopped | paused | ...
    reason: str
    check: str | None = None


NOTHING = Decision("none", None, "healthy")


def note(track: Track, obs: Observation) -> None:
    """Fold an observation into the track (heartbeats, check counters, foreign starts)."""
    for ev in obs.events:
        if ev.kind == "started" and not track.ours:
            track.since, track.armed, track.last_heartbeat = obs.now, False, None
    if obs.heartbeat:
        track.last_heartbeat, track.armed, track.ours = obs.now, True, False
        if track.escalated and obs.state == "running":
            track.escalated = False  # healthy again: watched as before
    if obs.state == "running" and obs.heartbeat is not None:
        track.last_ping = obs.now
    for r in obs.checks:
        a = track.apps.setdefault(r.name, AppTrack())
        a.last_run, a.last_detail = obs.now, r.detail
        if r.ok is True:
            a.failures = 0
        elif r.ok is False:
            a.failures += 1


def _crashed(obs: Observation) -> str | None:
    for ev in obs.events:
        if ev.kind == "crashed" or (ev.kind == "stopped" and ev.detail in CRASH_REASONS):
            return f"lifecycle event {ev.kind}/{ev.detail or '-'}"
    if obs.reason in CRASH_REASONS:
        return f"state stopped, reason {obs.reason}"
    return None


def _vm_problem(s: WatchdogSettings, t: Track, obs: Observation) -> Decision | None:
    if obs.state == "missing":
        return Decision("none", "missing", "not defined on this host")
    if obs.state == "stopped":
        why = _crashed(obs)
        if why:
            return Decision("start", "crashed", f"crashed ({why})")
        return Decision("none", "stopped", f"shut off ({obs.reason or 'on request'}): "
                                            "left alone")
    if obs.state == "paused":
        io = obs.reason == "ioerror" or any(e.kind == "paused" and e.detail == "ioerror"
                                            for e in obs.events)
        if io:
            return Decision("resume", "io-error", "paused on a disk I/O error")
        return Decision("none", "paused", f"paused ({obs.reason or 'on request'}): not a hang, "
                                          "left alone")
    if obs.state != "running" or not s.heartbeat:
        return None
    if t.armed and t.last_heartbeat is not None:
        silent = obs.now - t.last_heartbeat
        if silent >= s.hang_timeout_s:
            return Decision(s.action, "hung", f"guest agent silent for {silent:.0f}s "
                                              f"(hang_timeout {s.hang_timeout_s:g}s)")
    elif t.ours and obs.now - t.since >= s.min_uptime_s:
        return Decision(s.action, "hung", f"guest agent has not answered since the "
                                          f"{obs.now - t.since:.0f}s-old restart "
                                          f"(min_uptime {s.min_uptime_s:g}s)")
    return None


def _app_problem(s: WatchdogSettings, t: Track, obs: Observation) -> Decision | None:
    if obs.state != "running":
        return None
    for c in s.checks:
        a = t.apps.get(c.name)
        if a is None or a.failures < c.failures:
            continue
        recent = [x for x in a.restarts if obs.now - x < s.restart_window_s]
        why = f"{a.last_detail} ({a.failures} time(s) in a row)"
        if c.restart and len(recent) < c.restarts:
            return Decision("app-restart", "app-failed", why, c.name)
        more = (f"{len(recent)} restart(s) within {s.restart_window_s:g}s did not hold"
                if c.restart else "no restart command")
        return Decision(s.action, "app-failed", f"{why}; {more}: VM level", c.name)
    return None


def decide(s: WatchdogSettings, t: Track, obs: Observation) -> Decision:
    """The one decision for this cycle (pure: reads ``t``, changes nothing)."""
    d = _vm_problem(s, t, obs) or _app_problem(s, t, obs) or NOTHING
    if d.action not in VM_ACTIONS:
        return d
    if t.escalated:
        return Decision("none", d.problem, f"{d.reason}; already handed over "
                        f"({s.on_budget_exhausted}): waiting", d.check)
    used = len(t.recent(obs.now, s.restart_window_s))
    if used >= s.restart_budget:
        spent = (f"{d.reason}; restart budget spent ({used} of {s.restart_budget} within "
                 f"{s.restart_window_s:g}s)")
        return Decision("escalate" if s.on_budget_exhausted == "failover" else "alert",
                        d.problem, spent, d.check)
    return d
