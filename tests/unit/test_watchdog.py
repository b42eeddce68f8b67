"""Watchdogs on the fake driver: decisions, the monitor loop, budget and escalation."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.ha.appcheck import listening, process_running
from vmdr.ha.monitor import Monitor, WatchdogEvent
from vmdr.ha.watchdog import Observation, Track, decide, note
from vmdr.ha.wdsettings import AppCheck, WatchdogSettings
from vmdr.hypervisor import Screenshot
from vmdr.hypervisor.driver import GuestExecResult, LifecycleEvent
from vmdr.hypervisor.fake import FakeConsole, FakeDomainRecord, FakeFleet, FakeHost

URI = "fake://host01/system"
PROC_TCP = ("  sl  local_address rem_address   st tx_queue rx_queue\n"
            "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n"
            "   1: 0100007F:0016 0100007F:9C40 01 00000000:00000000 00:00000000 00000000\n")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def settings(**kw: object) -> WatchdogSettings:
    base: dict[str, object] = dict(vm="web", enabled=True, interval_s=10.0,
                                   hang_timeout_s=30.0, min_uptime_s=120.0)
    base.update(kw)
    return WatchdogSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def host() -> FakeHost:
    fleet = FakeFleet()
    h = fleet.host(URI)
    rec = h.add_domain(fl.domain_xml("web", fl.disk_xml("vda", "/d/web.qcow2")), active=True)
    rec.agent = True
    rec.screen = Screenshot("image/png", b"\x89PNG-fake")
    h.fleet = fleet  # type: ignore[attr-defined]
    return h


def monitor(host: FakeHost, s: WatchdogSettings, clock: Clock, **kw: object) -> Monitor:
    fleet = cast(FakeFleet, host.fleet)
    wall = lambda: datetime(2026, 12, 6, tzinfo=UTC)  # noqa: E731
    return Monitor(lambda: fleet.connect(URI), [s], clock=clock, wall=wall, **kw)  # type: ignore[arg-type]


def kinds(evs: list[WatchdogEvent]) -> list[str]:
    return [e.kind for e in evs]


# -- pure decisions ---------------------------------------------------------------------------

def test_decisions_for_each_state() -> None:
    s = settings()
    t = Track(since=0.0)
    assert decide(s, t, Observation(1, "stopped", "failed")).action == "start"
    crash = LifecycleEvent("web", "u", "crashed", "panicked")
    assert decide(s, t, Observation(1, "stopped", "", (crash,))).action == "start"
    left = decide(s, t, Observation(1, "stopped", "shutdown"))
    assert (left.action, left.problem) == ("none", "stopped")
    assert decide(s, t, Observation(1, "paused", "ioerror")).action == "resume"
    paused = decide(s, t, Observation(1, "paused", "user"))
    assert paused.action == "none" and "not a hang" in paused.reason
    assert decide(s, t, Observation(1, "missing")).problem == "missing"


def test_hang_needs_a_heartbeat_first_and_hang_timeout_of_silence() -> None:
    s = settings()
    t = Track(since=0.0)
    # never answered, not restarted by us: an agent-less guest is never "hung"
    assert decide(s, t, Observation(500, "running", heartbeat=False)).action == "none"
    note(t, Observation(10, "running", heartbeat=True))
    assert decide(s, t, Observation(39, "running", heartbeat=False)).action == "none"
    d = decide(s, t, Observation(40, "running", heartbeat=False))
    assert (d.action, d.problem) == ("reset", "hung") and "silent for 30s" in d.reason
    assert decide(settings(action="restart"), t, Observation(40, "running")).action == "restart"
    # after our own restart the guest gets min_uptime to answer
    t2 = Track(since=100.0, ours=True)
    assert decide(s, t2, Observation(219, "running", heartbeat=False)).action == "none"
    assert decide(s, t2, Observation(220, "running", heartbeat=False)).action == "reset"


def test_budget_spent_escalates_or_alerts_once() -> None:
    t = Track(since=0.0, actions=[100.0, 200.0, 300.0])
    obs = Observation(400, "stopped", "crashed")
    d = decide(settings(), t, obs)
    assert d.action == "escalate" and "budget spent (3 of 3" in d.reason
    assert decide(settings(on_budget_exhausted="alert"), t, obs).action == "alert"
    # outside the window the budget is back
    assert decide(settings(restart_window_s=250.0), t, obs).action == "start"
    t.escalated = True
    assert decide(settings(), t, obs).action == "none"
    assert decide(settings(restart_budget=0), Track(since=0.0), obs).action == "escalate"


def test_app_failures_restart_then_escalate_to_vm_level() -> None:
    chk = AppCheck("http", "tcp", "8080", restart="httpd", failures=2, restarts=1)
    s = settings(checks=(chk,))
    t = Track(since=0.0)
    from vmdr.ha.appcheck import CheckResult
    bad = (CheckResult("http", False, "TCP port 8080 not listening"),)
    note(t, Observation(1, "running", checks=bad))
    assert decide(s, t, Observation(1, "running")).action == "none"
    note(t, Observation(2, "running", checks=bad))
    d = decide(s, t, Observation(2, "running"))
    assert (d.action, d.check) == ("app-restart", "http")
    t.apps["http"].restarts.append(2)
    d = decide(s, t, Observation(2, "running"))
    assert d.action == "reset" and "VM level" in d.reason
    # unknown results (agent down) neither count nor clear
    note(t, Observation(3, "running", checks=(CheckResult("http", None, "?"),)))
    assert t.apps["http"].failures == 2


def test_proc_parsers() -> None:
    assert listening(PROC_TCP, 8080) and not listening(PROC_TCP, 22)
    assert not listening("garbage\n", 8080)
    assert process_running("init\nhttpd\n", "httpd")
    assert process_running("averyveryverylo\n", "averyveryverylongname")
    assert not process_running("init\n", "httpd")


# -- the monitor on the fake driver -----------------------------------------------------------

def test_crash_event_restarts_the_vm(host: FakeHost, tmp_path: Path) -> None:
    clock = Clock()
    mon = monitor(host, settings(evidence_dir=str(tmp_path)), clock)
    assert mon.cycle() == []
    host.crash("web", "failed")
    evs = mon.cycle()
    assert kinds(evs) == ["detected", "restarted"]
    assert "stopped/failed" in evs[0].reason
    assert host.domains["web"].state == "running"
    # our own start event is not taken for a foreign start, and nothing else happens
    clock.advance(10)
    assert mon.cycle() == []


def test_shutdown_on_request_is_left_alone_and_reported_once(host: FakeHost) -> None:
    clock = Clock()
    mon = monitor(host, settings(), clock)
    mon.cycle()
    host.fleet.connect(URI).lookup("web").destroy()  # type: ignore[union-attr]
    evs = mon.cycle()
    assert kinds(evs) == ["detected"] and "left alone" in evs[0].reason
    assert mon.cycle() == []
    assert host.domains["web"].state == "stopped"


def test_hung_guest_is_reset_with_a_screenshot_first(host: FakeHost, tmp_path: Path) -> None:
    clock = Clock()
    mon = monitor(host, settings(evidence_dir=str(tmp_path)), clock)
    mon.cycle()  # heartbeat: armed
    host.domains["web"].agent = False
    evs: list[WatchdogEvent] = []
    for _ in range(4):
        clock.advance(10)
        evs += mon.cycle()
    assert kinds(evs) == ["detected", "reset"]
    assert host.domains["web"].resets == 1
    shots = [p for p in evs[1].evidence if p.endswith(".png")]
    assert shots and Path(shots[0]).read_bytes() == b"\x89PNG-fake"
    assert Path(shots[0]).parent == tmp_path / "web"
    assert "restart 1 of 3" in evs[1].reason


def test_budget_exhaustion_escalates_to_the_ha_layer(host: FakeHost, tmp_path: Path) -> None:
    clock = Clock()
    handed: list[str] = []

    def escalate(vm: str, ev: object) -> bool:
        handed.append(vm)
        return True

    mon = monitor(host, settings(evidence_dir=str(tmp_path), restart_budget=2), clock,
                  escalate=escalate)
    mon.cycle()
    host.domains["web"].agent = False  # hangs, and stays hung after every reset
    evs: list[WatchdogEvent] = []
    for _ in range(60):
        clock.advance(10)
        evs += mon.cycle()
    acts = [k for k in kinds(evs) if k != "detected"]
    assert acts == ["reset", "reset", "escalated"]
    assert handed == ["web"] and host.domains["web"].resets == 2
    # the guest recovers: watched again, with the budget still spent in the window
    host.domains["web"].agent = True
    clock.advance(10)
    assert mon.cycle() == [] and not mon.vms["web"].track.escalated


def test_alert_when_no_ha_layer_or_alert_configured(host: FakeHost) -> None:
    for s, cb in ((settings(restart_budget=0), None),
                  (settings(restart_budget=0, on_budget_exhausted="alert"),
                   lambda vm, ev: True)):
        alerts: list[WatchdogEvent] = []
        clock = Clock()
        mon = monitor(host, s, clock, escalate=cb, alert=alerts.append)
        host.domains["web"].state = "running"
        host.crash("web")
        evs = mon.cycle()
        assert kinds(evs) == ["detected", "gave-up"] and alerts == [evs[1]]
        assert host.domains["web"].state == "stopped"  # type: ignore[comparison-overlap]
        assert mon.cycle() == []  # once


def test_io_error_pause_is_resumed(host: FakeHost) -> None:
    mon = monitor(host, settings(), Clock())
    mon.cycle()
    host.io_error("web")
    evs = mon.cycle()
    assert kinds(evs) == ["detected", "resumed"] and host.domains["web"].state == "running"


def test_unanswered_screenshot_means_qemu_hangs_power_cycle(host: FakeHost, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    def hung(self: FakeConsole) -> None:
        time.sleep(1)

    monkeypatch.setattr(FakeConsole, "screenshot", hung)
    clock = Clock()
    mon = monitor(host, settings(evidence_dir=str(tmp_path)), clock, screenshot_timeout=0.05)
    mon.cycle()
    host.domains["web"].agent = False
    evs: list[WatchdogEvent] = []
    for _ in range(4):
        clock.advance(10)
        evs += mon.cycle()
    assert kinds(evs) == ["detected", "restarted"]
    assert "QEMU does not answer" in evs[1].reason and host.domains["web"].resets == 0


def _guest(rec: FakeDomainRecord, state: dict[str, bool]) -> None:
    def handler(argv: list[str]) -> GuestExecResult:
        script = argv[-1]
        if "/proc/net/tcp" in script:
            return GuestExecResult(1, 0, PROC_TCP if state["up"] else "")
        if script == "start-httpd":
            state["up"] = state["fixable"]
            return GuestExecResult(2, 0)
        return GuestExecResult(3, 127, "", "sh: not found")
    rec.exec_handler = handler


def test_app_check_restarts_the_service_then_escalates(host: FakeHost, tmp_path: Path) -> None:
    chk = AppCheck("http", "tcp", "8080", restart="start-httpd", failures=2, restarts=2)
    s = settings(checks=(chk,), app_interval_s=30.0, evidence_dir=str(tmp_path))
    state = {"up": True, "fixable": True}
    _guest(host.domains["web"], state)
    clock = Clock()
    mon = monitor(host, s, clock)
    assert mon.cycle() == []
    state["up"] = False
    evs: list[WatchdogEvent] = []
    for _ in range(6):
        clock.advance(10)
        evs += mon.cycle()
    assert kinds(evs) == ["detected", "app-restarted"] and state["up"]
    assert "not listening" in evs[0].reason and evs[1].check == "http"
    # now the restart does not hold: two more app restarts, then the VM is reset
    state.update(up=False, fixable=False)
    evs = []
    for _ in range(30):
        clock.advance(10)
        evs += mon.cycle()
    # the second restart (two within the window), then the VM level, until its budget
    assert kinds(evs) == ["detected", "app-restarted"] + ["detected", "reset"] * 3 + [
        "detected", "gave-up"]
    reset = next(e for e in evs if e.kind == "reset")
    assert reset.problem == "app-failed" and "VM level" in reset.reason


def test_host_unreachable_is_reported_once_and_recovers(host: FakeHost) -> None:
    mon = monitor(host, settings(), Clock())
    mon.cycle()
    host.up = False
    assert kinds(mon.cycle()) == ["detected"]
    assert mon.cycle() == []
    host.up = True
    assert next(e.reason for e in mon.cycle()).startswith("host reachable again")


# -- the libvirt driver's events, on libvirt's own test:/// driver ------------------------------

def test_libvirt_lifecycle_events_are_typed() -> None:
    libvirt = pytest.importorskip("libvirt")
    from vmdr.hypervisor import connect
    from vmdr.hypervisor.events import translate

    ev = translate(libvirt, "web", "u", libvirt.VIR_DOMAIN_EVENT_STOPPED,
                   libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
    assert (ev.kind, ev.detail, ev.unexpected) == ("stopped", "failed", True)
    ev = translate(libvirt, "web", "u", libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                   libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR)
    assert (ev.kind, ev.detail, ev.unexpected) == ("paused", "ioerror", True)
    ev = translate(libvirt, "web", "u", libvirt.VIR_DOMAIN_EVENT_CRASHED,
                   libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED)
    assert (ev.kind, ev.detail, ev.unexpected) == ("crashed", "panicked", True)
    assert not translate(libvirt, "web", "u", libvirt.VIR_DOMAIN_EVENT_STOPPED,
                         libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED).unexpected

    got: list[LifecycleEvent] = []
    with connect("test:///default") as hv, hv.subscribe(got.append) as sub, \
            connect("test:///default") as other:
        dom = other.lookup("test")
        dom.suspend()
        dom.resume()
        dom.destroy()
        assert dom.state_reason() == "destroyed"
        dom.start()
        deadline = time.monotonic() + 10
        while len(got) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.alive
    assert [(e.domain, e.kind, e.detail) for e in got] == [
        ("test", "paused", "paused"), ("test", "resumed", "unpaused"),
        ("test", "stopped", "destroyed"), ("test", "started", "booted")]
