"""The watchdog loop of one host: observe, decide (:mod:`.watchdog`), act, record.

:class:`Monitor` is a small object with an injected driver factory and clocks, so the
agent can host it and unit tests drive it on the fake driver cycle by cycle::

    mon = Monitor(lambda: connect(uri), settings, escalate=ha_layer.restart_elsewhere)
    mon.cycle()              # one pass over every watched VM; returns its events
    mon.run(stop_event)      # cycles until stopped; lifecycle events wake it at once

Every decision that does something, or finds something, is a :class:`WatchdogEvent`
with its reason: ``detected``, ``reset``, ``restarted``, ``resumed``, ``app-restarted``,
``escalated``, ``gave-up``, ``action-failed``. Before a reset or restart the console
screen (and the last 64 KiB of the serial console log) is saved under
``evidence_dir/<vm>/`` as evidence. A screenshot that does not come back within
``screenshot_timeout`` means QEMU itself no longer answers (a hung or stopped QEMU
process): a reset would block on the same monitor, so the VM is powered off and started
instead.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import (
    DomainNotFound,
    HypervisorError,
    HypervisorUnavailable,
    HypervisorUnsupported,
)
from vmdr.timeutil import utcnow

from .appcheck import CheckResult, restart_app, run_check
from .ports import DomainPort, EventPort, HostPort, ScreenshotPort, SubscriptionPort
from .watchdog import Decision, Observation, Track, decide, note
from .wdsettings import WatchdogSettings

__all__ = ["Monitor", "WatchdogEvent"]

log = logging.getLogger(__name__)

CONSOLE_TAIL = 64 * 1024
EXTENSIONS = {"image/png": "png", "image/x-portable-pixmap": "ppm"}


@dataclass(frozen=True)
class WatchdogEvent:
    """One recorded decision."""

    time: str  # ISO 8601, UTC
    vm: str
    kind: str  # detected | reset | restarted | resumed | app-restarted | escalated | ...
    reason: str
    problem: str | None = None
    check: str | None = None
    evidence: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = list(self.evidence)
        return d

    def line(self) -> str:
        ev = f" [evidence: {', '.join(self.evidence)}]" if self.evidence else ""
        return f"{self.time} {self.vm}: {self.kind}: {self.reason}{ev}"


Escalate = Callable[[str, WatchdogEvent], bool]


@dataclass
class _Watched:
    settings: WatchdogSettings
    track: Track
    pending: list[EventPort] = field(default_factory=list)


class Monitor:
    """Watchdogs for the VMs of one host.

    ``escalate(vm, event)`` is called once when a VM's restart budget is spent and
    ``on_budget_exhausted = "failover"``: the HA layer restarts it on another host and
    returns True (False or no callback: an alert is raised instead). ``alert(event)``
    receives every ``gave-up`` (default: a log warning). ``sink(event)`` sees every event.
    """

    def __init__(
        self, connect: Callable[[], HostPort], settings: Sequence[WatchdogSettings], *,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], datetime] = utcnow,
        sink: Callable[[WatchdogEvent], None] | None = None, escalate: Escalate | None = None,
        alert: Callable[[WatchdogEvent], None] | None = None, ping_timeout: int = 3,
        screenshot_timeout: float = 10.0, history: int = 1000,
    ) -> None:
        self._connect = connect
        self._clock = clock
        self._wall = wall
        self._sink = sink
        self._escalate = escalate
        self._alert = alert or (lambda ev: log.warning("watchdog alert: %s", ev.line()))
        self.ping_timeout = ping_timeout
        self.screenshot_timeout = screenshot_timeout
        now = clock()
        self.vms = {s.vm: _Watched(s, Track(since=now)) for s in settings}
        self.events: deque[WatchdogEvent] = deque(maxlen=history)
        self.received: deque[EventPort] = deque(maxlen=history)  # from the driver
        self._queue: queue.SimpleQueue[EventPort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._hv: HostPort | None = None
        self._sub: SubscriptionPort | None = None
        self._subscribable = True
        self._down: str | None = None

    # -- connection and events -------------------------------------------------------------

    def _on_event(self, ev: EventPort) -> None:
        """Runs on the driver's event thread: queue and wake the loop, nothing more."""
        if ev.domain in self.vms:
            self.received.append(ev)
            self._queue.put(ev)
            self._wake.set()

    def _ensure(self) -> HostPort:
        if self._hv is None:
            self._hv = self._connect()
        if self._subscribable and (self._sub is None or not self._sub.alive):
            if self._sub is not None:
                self._sub.close()
                self._sub = None
            try:
                self._sub = self._hv.subscribe(self._on_event)
            except HypervisorUnsupported:
                self._subscribable = False  # poll only
        return self._hv

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._hv is not None:
            self._hv.close()
            self._hv = None

    def _drop_connection(self) -> None:
        try:
            self.close()
        except HypervisorError:
            self._hv, self._sub = None, None

    # -- recording --------------------------------------------------------------------------

    def _record(self, vm: str, kind: str, reason: str, d: Decision | None = None,
                evidence: Sequence[str] = ()) -> WatchdogEvent:
        ev = WatchdogEvent(self._wall().isoformat(timespec="seconds").replace("+00:00", "Z"),
                           vm, kind, reason, d.problem if d else None,
                           d.check if d else None, tuple(evidence))
        self.events.append(ev)
        log.info("watchdog: %s", ev.line())
        if self._sink is not None:
            self._sink(ev)
        return ev

    # -- one cycle --------------------------------------------------------------------------

    def cycle(self) -> list[WatchdogEvent]:
        """One pass over every watched VM: at most one decision each. Its events."""
        first = len(self.events)
        while True:
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                break
            self.vms[ev.domain].pending.append(ev)
        try:
            hv = self._ensure()
        except HypervisorError as exc:
            self._host_down(exc)
            return list(self.events)[first:]
        if self._down is not None:
            self._record("*", "detected", f"host reachable again ({hv.uri})")
            self._down = None
        for name, w in self.vms.items():
            try:
                self._one(hv, name, w)
            except DomainNotFound:
                continue  # undefined meanwhile: seen as missing next cycle
            except HypervisorUnavailable as exc:
                self._host_down(exc)
                break
            except HypervisorError as exc:
                self._record(name, "action-failed", exc.message)
        return list(self.events)[first:]

    def _host_down(self, exc: HypervisorError) -> None:
        if self._down is None:
            self._record("*", "detected", f"host unreachable: {exc.message}")
            self._down = exc.message
        self._drop_connection()

    def observe(self, hv: HostPort, w: _Watched, *, force: bool = False
                ) -> tuple[Observation, DomainPort | None]:
        """What the VM looks like now; pings and checks only when due (or ``force``)."""
        s, t, now = w.settings, w.track, self._clock()
        events, w.pending = tuple(w.pending), []
        try:
            dom = hv.lookup(s.vm)
        except DomainNotFound:
            return Observation(now, "missing", events=events), None
        state, reason = dom.state(), dom.state_reason()
        heartbeat: bool | None = None
        if state == "running" and s.heartbeat and (
                force or t.last_ping is None or now - t.last_ping >= s.interval_s):
            heartbeat = dom.guest_ping(timeout=self.ping_timeout)
        checks: list[CheckResult] = []
        agent_ok = heartbeat if heartbeat is not None else (
            t.last_heartbeat is not None and t.last_heartbeat == t.last_ping)
        if state == "running" and (agent_ok or not s.heartbeat):
            for c in s.checks:
                a = t.apps.get(c.name)
                if force or a is None or a.last_run is None or \
                        now - a.last_run >= s.app_interval_s:
                    checks.append(run_check(dom, c))
        return Observation(now, state, reason, events, heartbeat, tuple(checks)), dom

    def _one(self, hv: HostPort, name: str, w: _Watched) -> None:
        obs, dom = self.observe(hv, w)
        note(w.track, obs)
        d = decide(w.settings, w.track, obs)
        t = w.track
        if d.action == "none":
            if d.problem is None:
                t.last_problem = None
            elif d.problem != t.last_problem:
                t.last_problem = d.problem
                self._record(name, "detected", d.reason, d)
            return
        t.last_problem = d.problem
        if d.action == "app-restart":
            assert dom is not None
            self._app_restart(name, w, dom, d)
            return
        self._record(name, "detected", d.reason, d)
        if d.action in ("escalate", "alert"):
            self._give_up(name, w, d)
            return
        assert dom is not None
        self._vm_action(name, w, dom, d)

    # -- actions ----------------------------------------------------------------------------

    def _app_restart(self, name: str, w: _Watched, dom: DomainPort, d: Decision) -> None:
        check = next(c for c in w.settings.checks if c.name == d.check)
        a = w.track.apps[check.name]
        a.restarts.append(self._clock())
        a.failures = 0
        self._record(name, "detected", d.reason, d)
        worked, what = restart_app(dom, check)
        self._record(name, "app-restarted" if worked else "action-failed",
                     f"{check.describe()}: {what}", d)

    def _give_up(self, name: str, w: _Watched, d: Decision) -> None:
        w.track.escalated = True
        if d.action == "escalate" and self._escalate is not None:
            ev = self._record(name, "escalated", "restart budget spent: handed to the HA "
                                                 "layer to restart on another host", d)
            try:
                if self._escalate(name, ev):
                    return
                why = "the HA layer declined"
            except Exception as exc:  # the HA layer's failure must not stop the watchdog
                why = f"the HA layer failed: {exc}"
        elif d.action == "escalate":
            why = "no HA layer attached to restart it on another host"
        else:
            why = "on_budget_exhausted = alert"
        ev = self._record(name, "gave-up", f"restart budget spent ({why}): alert raised, "
                                           "the VM is left as it is", d)
        self._alert(ev)

    def _vm_action(self, name: str, w: _Watched, dom: DomainPort, d: Decision) -> None:
        s, t = w.settings, w.track
        evidence: list[str] = []
        kind = {"start": "restarted", "resume": "resumed", "reset": "reset",
                "restart": "restarted"}[d.action]
        action = d.action
        note_ = ""
        if action in ("reset", "restart"):
            shot, why = self._screenshot(dom)
            evidence += self._save_evidence(s, dom, shot)
            if shot is None:
                note_ = f"; no screenshot ({why})"
                if why.startswith("timed out"):
                    action, kind = "restart", "restarted"
                    note_ += ": QEMU does not answer, powered off and started instead"
        elif action == "start":
            evidence += self._save_evidence(s, dom, None)  # the console up to the crash
        t.actions.append(self._clock())
        try:
            if action == "start":
                dom.destroy()  # a crashed domain kept for a dump (on_crash=preserve)
                dom.start()
            elif action == "resume":
                dom.resume()
            elif action == "reset":
                try:
                    dom.reset()
                except HypervisorError as exc:
                    note_ += f"; reset failed ({exc.message}): powered off and started"
                    kind = "restarted"
                    dom.destroy()
                    dom.start()
            else:
                dom.destroy()
                dom.start()
        except HypervisorError as exc:
            self._record(name, "action-failed", f"{action}: {exc.message}", d, evidence)
            return
        finally:
            now = self._clock()
            t.since, t.ours, t.armed = now, True, False
            t.last_heartbeat, t.last_ping = None, now
            for a in t.apps.values():
                a.failures, a.last_run = 0, now
        used = len(t.recent(self._clock(), s.restart_window_s))
        self._record(name, kind, f"{action} after: {d.reason}{note_} (restart {used} of "
                                 f"{s.restart_budget} within {s.restart_window_s:g}s)",
                     d, evidence)

    def _screenshot(self, dom: DomainPort) -> tuple[ScreenshotPort | None, str]:
        box: list[ScreenshotPort | BaseException] = []

        def grab() -> None:
            try:
                box.append(dom.console().screenshot())
            except BaseException as exc:
                box.append(exc)

        th = threading.Thread(target=grab, name="vmdr-watchdog-screenshot", daemon=True)
        th.start()
        th.join(self.screenshot_timeout)
        if not box:
            return None, f"timed out after {self.screenshot_timeout:g}s"
        got = box[0]
        if isinstance(got, BaseException):
            return None, getattr(got, "message", str(got))
        return got, ""

    def _save_evidence(self, s: WatchdogSettings, dom: DomainPort,
                       shot: ScreenshotPort | None) -> list[str]:
        out: list[str] = []
        stamp = self._wall().strftime("%Y%m%dT%H%M%S.%fZ")
        d = os.path.join(s.evidence_dir, s.vm)
        try:
            os.makedirs(d, mode=0o750, exist_ok=True)
            if shot is not None:
                p = os.path.join(d, f"{stamp}-screen.{EXTENSIONS.get(shot.mime, 'bin')}")
                with open(p, "wb") as f:
                    f.write(shot.data)
                out.append(p)
            try:
                text = dom.console().read_log()
            except HypervisorError:
                text = ""
            if text:
                p = os.path.join(d, f"{stamp}-console.log")
                with open(p, "w", encoding="utf-8") as f:
                    f.write(text[-CONSOLE_TAIL:])
                out.append(p)
        except OSError as exc:
            log.warning("watchdog: cannot save evidence in %s: %s", d, exc)
        return out

    # -- the loop ---------------------------------------------------------------------------

    def next_wait(self) -> float:
        """Seconds until the next ping or check is due (0.5 s to 5 s)."""
        now, waits = self._clock(), [5.0]
        for w in self.vms.values():
            s, t = w.settings, w.track
            if s.heartbeat:
                waits.append((t.last_ping or 0.0) + s.interval_s - now)
            for a in t.apps.values():
                waits.append((a.last_run or 0.0) + s.app_interval_s - now)
            if s.checks and not t.apps:
                waits.append(0.0)
        return min(5.0, max(0.5, min(waits)))

    def run(self, stop: threading.Event, *, max_cycles: int | None = None) -> None:
        """Cycle until ``stop`` is set; lifecycle events wake the loop at once."""
        n = 0
        try:
            while not stop.is_set():
                self.cycle()
                n += 1
                if max_cycles is not None and n >= max_cycles:
                    return
                self._wake.wait(self.next_wait())
                self._wake.clear()
        finally:
            self.close()

    def wake(self) -> None:
        self._wake.set()
