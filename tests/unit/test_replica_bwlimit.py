"""``vmdr replicate --bwlimit``: a cycle's writes charged to the rate limiter, a mirror's
block-job speed following the bandwidth windows by the clock, and a replicate policy's
windows reaching its job's command line."""

from __future__ import annotations

import argparse
import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_mirror_state import CFG, cfg_of
from vmdr.agent import scheduler as sched
from vmdr.agent.history import Job
from vmdr.agent.runner import job_command
from vmdr.errors import ConfigError, HypervisorError, HypervisorUnavailable, UsageError
from vmdr.hypervisor.driver import CopyStatus
from vmdr.jobs.mirror import MirrorOptions, Supervisor
from vmdr.jobs.replica_throttle import MirrorBandwidth, throttled
from vmdr.jobs.replicate import ReplicaSpec
from vmdr.storage.throttle import TokenBucket, WindowedBucket, Windows

MIB = 1 << 20
OFFICE = "mon..fri 08:00..18:00 4M; * unlimited"


def at(day: int, hh: int, mm: int = 0) -> dt.datetime:
    """Day 0 = Monday 2026-11-30."""
    return dt.datetime(2026, 11, 30, hh, mm) + dt.timedelta(days=day)


class Writer:
    def __init__(self) -> None:
        self.ops: list[tuple[str, int, int]] = []
        self.path = "/srv/r/web/web-replica-vda.qcow2"

    def write(self, offset: int, data: bytes) -> None:
        self.ops.append(("write", offset, len(data)))

    def zero(self, offset: int, length: int) -> None:
        self.ops.append(("zero", offset, length))

    def close(self, *, flush: bool = True) -> None:
        self.ops.append(("close", 0, 0))


def test_a_cycle_charges_its_data_writes_to_the_bucket() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(MIB, burst=64 << 10, clock=lambda: now[0], sleep=sleep)
    inner = Writer()
    w = throttled(inner, bucket)
    for i in range(8):
        w.write(i * MIB, bytes(MIB))
    w.zero(8 * MIB, 64 * MIB)  # a few bytes on the wire: not charged
    w.close()
    assert [o[0] for o in inner.ops] == ["write"] * 8 + ["zero", "close"]
    assert w.path == inner.path  # everything else is the writer's own
    # 8 MiB at 1 MiB/s (a burst of 64 KiB): about 8 s of (fake) waiting
    assert 7.5 < sum(slept) < 8.1
    assert throttled(inner, None) is inner


def test_a_cycle_follows_the_windows_by_the_clock() -> None:
    wall = [at(0, 7, 59)]  # Monday, a minute before the office window opens
    mono = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        mono[0] += s

    bucket = WindowedBucket(Windows.parse(OFFICE), now=lambda: wall[0],
                            clock=lambda: mono[0], sleep=sleep)
    w = throttled(Writer(), bucket)
    w.write(0, bytes(8 * MIB))
    assert slept == []  # unlimited before 08:00
    wall[0], mono[0] = at(0, 8, 1), mono[0] + 2.0
    for i in range(4):
        w.write(i * MIB, bytes(2 * MIB))
    assert 1.5 < sum(slept) < 2.1  # 8 MiB at 4 MiB/s


class Job_:
    """A mirror's block job as the supervisor sees it."""

    def __init__(self, disk: str, speeds: list[tuple[str, int]], fail: bool = False) -> None:
        self.disk, self.speeds, self.fail = disk, speeds, fail

    def status(self) -> CopyStatus:
        return CopyStatus(self.disk, 100, 100, True)

    def set_speed(self, bandwidth: int) -> None:
        if self.fail:
            raise HypervisorError(f"setting the speed of the block job of {self.disk}: gone")
        self.speeds.append((self.disk, bandwidth))


def test_mirror_bandwidth_splits_the_window_over_the_disks() -> None:
    wall = [at(0, 9)]
    bw = MirrorBandwidth(Windows.parse(OFFICE), now=lambda: wall[0])
    assert bw.start(2) == 2 * MIB  # 4 MiB/s for the mirror, 2 per disk
    speeds: list[tuple[str, int]] = []
    jobs = [Job_("vda", speeds), Job_("vdb", speeds)]
    assert bw.follow(jobs) is None and speeds == []  # same window: nothing to do
    wall[0] = at(0, 18)  # the window closes
    assert bw.follow(jobs) == 0 and speeds == [("vda", 0), ("vdb", 0)]
    wall[0] = at(1, 8, 30)  # Tuesday morning: capped again
    assert bw.follow(jobs) == 2 * MIB and speeds[-2:] == [("vda", 2 * MIB), ("vdb", 2 * MIB)]
    assert MirrorBandwidth(Windows.parse("10M"), now=lambda: wall[0]).start(1) == 10 * MIB


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def phase(self, name: str, message: str, **kw: Any) -> None:
        self.seen.append((name, message))

    def warning(self, message: str, **kw: Any) -> None:
        self.seen.append(("warning", message))


class Quiet:
    """Tunnel, export and site of a mirror that stays in step (nothing to write)."""

    def alive(self) -> bool:
        return True

    def run(self, *a: Any, **kw: Any) -> None:
        pass


def _spec() -> ReplicaSpec:
    return ReplicaSpec(vm="web", target_uri="qemu+ssh://root@dr1/system",
                       directory="/srv/r/web")


def test_a_running_mirror_follows_the_windows_by_the_clock() -> None:
    """The supervisor's loop changes the block jobs' speed when a window opens or closes
    (fake wall clock: 17:58, 17:59, 18:00... on a Monday)."""
    ticks = iter(range(10_000))
    minute = [0]
    stop = threading.Event()

    def wall() -> dt.datetime:
        minute[0] += 1
        if minute[0] > 6:
            stop.set()
        return at(0, 17, 56) + dt.timedelta(minutes=minute[0])

    events = Events()
    opts = MirrorOptions(point_interval_s=1e9, poll_s=0.0, bandwidth=Windows.parse(OFFICE))
    sup = Supervisor(_spec(), opts, "qemu:///system", events, stop,  # type: ignore[arg-type]
                     clock=lambda: float(next(ticks)), wall=wall)
    bw = MirrorBandwidth(Windows.parse(OFFICE), now=wall)
    assert bw.start(1) == 4 * MIB  # 17:57: capped
    speeds: list[tuple[str, int]] = []
    q: Any = Quiet()
    why = sup._supervise(q, q, q, q, {"vda": Job_("vda", speeds)}, None, bw)
    assert why is None and stop.is_set()
    assert speeds == [("vda", 0)]  # set once, at 18:00
    assert ("bandwidth", "web: mirror bandwidth now unlimited") in events.seen


def test_a_failed_speed_change_is_retried_not_fatal() -> None:
    events = Events()
    sup = Supervisor(_spec(), MirrorOptions(), "qemu:///system", events)  # type: ignore[arg-type]
    wall = [at(0, 9)]
    bw = MirrorBandwidth(Windows.parse(OFFICE), now=lambda: wall[0])
    bw.start(1)
    wall[0] = at(0, 19)
    speeds: list[tuple[str, int]] = []
    sup._follow(bw, {"vda": Job_("vda", speeds, fail=True)})
    assert bw.applied == 4 * MIB and events.seen[-1][0] == "warning"
    sup._follow(bw, {"vda": Job_("vda", speeds)})
    assert bw.applied == 0 and speeds == [("vda", 0)]


# -- the agent ------------------------------------------------------------------------------

HOT_BW = CFG.replace('rpo = "30s"\n', 'rpo = "30s"\nbandwidth = ["mon..fri 08:00..18:00 20M", '
                     '"* 100M"]\n', 1)


def test_a_replicate_policy_passes_its_windows(tmp_path: Path) -> None:
    cfg = cfg_of(HOT_BW, tmp_path)
    sched.schedules(cfg)  # valid
    job = Job("j1", "replicate", "db1", "queued", 0.0, policy="hot", repository="",
              args={"mode": "sync", "to": "qemu+ssh://root@dr1/system", "rpo": 30.0})
    cmd = job_command(cfg, job)
    i = cmd.index("--bwlimit")
    assert cmd[i + 1] == "mon..fri 08:00..18:00 20M; * 100M"
    warm = Job("j2", "replicate", "web1", "queued", 0.0, policy="warm", repository="",
               args={"mode": "snapshot", "to": None, "rpo": None})
    assert "--bwlimit" not in job_command(cfg, warm)  # a policy without windows


def test_a_bad_window_on_a_replicate_policy_stops_the_agent(tmp_path: Path) -> None:
    cfg = cfg_of(HOT_BW.replace("20M", "lots"), tmp_path)
    with pytest.raises(ConfigError, match=r"policies\.hot\.bandwidth: .*lots"):
        sched.schedules(cfg)


# -- the command line -------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from vmdr.cli import replicate_cmds

    top = argparse.ArgumentParser(prog="vmdr")
    replicate_cmds.register(top.add_subparsers(dest="cmd"), [])
    return top


def test_replicate_takes_bwlimit(tmp_path: Path) -> None:
    from tests.unit.test_replica import ESTATE
    from vmdr import config
    from vmdr.cli.common import Globals
    from vmdr.cli.replicate_cmds import _specs

    ns = _parser().parse_args(["replicate", "web", "--to", "dr1", "--bwlimit",
                               "mon..fri 08:00..18:00 20M; * 100M"])
    p = tmp_path / "estate.toml"
    p.write_text(ESTATE)
    g = Globals(repo=None, password_file=None, key_file=None, json=True, progress=False,
                config=config.load(str(p)))
    (spec,) = _specs(ns, g, ["web"])
    assert isinstance(spec.bandwidth, WindowedBucket)
    assert str(spec.bandwidth.windows) == "mon..fri 08:00..18:00 20M; * 100M"
    ns = _parser().parse_args(["replicate", "web", "--to", "dr1", "--bwlimit", "10M"])
    assert _specs(ns, g, ["web"])[0].bandwidth.rate == 10 * MIB  # type: ignore[union-attr]
    ns = _parser().parse_args(["replicate", "web", "--to", "dr1"])
    assert _specs(ns, g, ["web"])[0].bandwidth is None
    ns = _parser().parse_args(["replicate", "web", "--to", "dr1", "--bwlimit", "fast"])
    with pytest.raises(UsageError, match="invalid rate 'fast'"):
        _specs(ns, g, ["web"])


# -- several mirrors at once -----------------------------------------------------------------

def _globals(tmp_path: Path) -> Any:
    from tests.unit.test_replica import ESTATE
    from vmdr import config
    from vmdr.cli.common import Globals

    p = tmp_path / "estate.toml"
    p.write_text(ESTATE)
    return Globals(repo=None, password_file=None, key_file=None, json=True, progress=False,
                   config=config.load(str(p)))


def test_all_runs_each_mirror_in_a_process_of_its_own(tmp_path: Path, monkeypatch: Any,
                                                     capsys: Any) -> None:
    import json
    import os

    from vmdr.cli import replicate_cmds as rc

    parent = os.getpid()

    def run(ns: Any, g: Any, spec: ReplicaSpec, mode: str) -> dict[str, Any]:
        if spec.vm == "db":
            raise HypervisorUnavailable("DR host gone")  # exit 12 for this one only
        return {"vm": spec.vm, "status": "ok", "pid": os.getpid(), "mode": mode,
                "bwlimit": str(rc._continuous_options(ns, spec, mode).bandwidth)}

    monkeypatch.setattr(rc, "_run_continuous", run)
    monkeypatch.setattr("vmdr.cli.common._current_events", None)  # an earlier test's
    g = _globals(tmp_path)
    ns = _parser().parse_args(["replicate", "--all", "--continuous", "--bwlimit", "5M"])
    code = rc.cmd_replicate(ns, g)
    docs = {d["vm"]: d for d in json.loads(capsys.readouterr().out)["results"]}
    assert code == 12, docs
    assert docs["web"]["status"] == "ok" and docs["web"]["pid"] != parent
    assert docs["web"]["mode"] == "mirror" and docs["web"]["bwlimit"] == "5M"
    assert docs["db"] == {"vm": "db", "status": "failed", "error": "DR host gone",
                          "exit_code": 12}


def test_a_stop_reaches_every_mirror_process(tmp_path: Path, monkeypatch: Any,
                                            capsys: Any) -> None:
    import json
    import os
    import signal
    import time

    from vmdr.cli import replicate_cmds as rc

    def run(ns: Any, g: Any, spec: ReplicaSpec, mode: str) -> dict[str, Any]:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_a: stop.set())
        (tmp_path / f"{spec.vm}.up").write_text("")
        stopped = stop.wait(60)
        return {"vm": spec.vm, "status": "ok", "stopped_by": "signal" if stopped else "time"}

    monkeypatch.setattr(rc, "_run_continuous", run)
    monkeypatch.setattr("vmdr.cli.common._current_events", None)
    ns = _parser().parse_args(["replicate", "--all", "--continuous"])

    def stop_when_up() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                (tmp_path / f"{vm}.up").exists() for vm in ("web", "db")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to the parent, as the agent's stop does

    old = signal.getsignal(signal.SIGTERM)
    th = threading.Thread(target=stop_when_up)
    th.start()
    try:
        assert rc.cmd_replicate(ns, _globals(tmp_path)) == 0
    finally:
        th.join()
        signal.signal(signal.SIGTERM, old)
    docs = json.loads(capsys.readouterr().out)["results"]
    assert sorted((d["vm"], d["stopped_by"]) for d in docs) == [("db", "signal"),
                                                               ("web", "signal")]
