"""The agent runs jobs as processes: events parsed, failures and kill -9 recorded, the agent
keeps serving; interrupted jobs marked on restart; schedules fire from the loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from vmdr import config
from vmdr.agent.daemon import Agent
from vmdr.agent.history import History, Job
from vmdr.agent.inventory import HostInfo, StaticVMs
from vmdr.agent.runner import Runner, _event, job_command
from vmdr.agent.scheduler import VMInfo

# A stand-in for `vmdr … --json-events`: follows the event contract (docs/events.md).
FAKE_JOB = r'''
import json, os, sys, time
kind, vm = sys.argv[1], sys.argv[2]
job = os.environ.get("VMDR_JOB_ID", "")
def ev(t, **kw):
    kw.update(type=t, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), job=job)
    sys.stderr.write(json.dumps(kw) + "\n"); sys.stderr.flush()
ev("start", command=kind, vm=vm)
sys.stderr.write("vmdr: a plain log line for " + vm + "\n")
sys.stderr.write("{not json either\n")
if "slow" in vm:
    ev("phase", phase="reading")
    time.sleep(float(os.environ.get("FAKE_SLEEP", "30")))
for i in range(3):
    ev("progress", done=i + 1, total=3, phase="copying")
if "fail" in vm:
    ev("error", message="disk vda: read failed")
    sys.stderr.write("vmdr: error: disk vda: read failed\n")
    ev("end", outcome="failed", exit_code=10)
    sys.exit(10)
ev("end", outcome="ok", result={"bytes_stored": 1234, "snapshot": "ab12cd34"})
print(json.dumps({"results": [{"vm": vm, "status": "ok", "snapshot": "ab12cd34",
                              "bytes_stored": 1234}]}))
'''

CONFIG = """
[repositories.local]
url = "{tmp}/repo"
password_file = "{tmp}/pw"

[repositories.offsite]
url = "{tmp}/offsite"

[agent]
state = "{tmp}/agent.db"
host = "h1"

[policies.demo]
vms = ["vm*"]
schedule = "minutely"
repository = "local"
copy = ["offsite"]
"""


def fake_command(job: Job) -> list[str]:
    return [sys.executable, "-c", FAKE_JOB, job.type, job.vm or "-"]


def make_cfg(tmp_path: Path, extra: str = "") -> config.Config:
    p = tmp_path / "vmdr.toml"
    p.write_text(CONFIG.format(tmp=tmp_path) + extra)
    return config.load(str(p))


def make_agent(tmp_path: Path, vms: list[str], clock: object = time.time,
               extra: str = "") -> Agent:
    cfg = make_cfg(tmp_path, extra)
    src = StaticVMs([VMInfo(n, "h1") for n in vms], HostInfo("h1", 2, 2048))
    return Agent(cfg, vms=src, command=fake_command, clock=clock)  # type: ignore[arg-type]


def queue(a: Agent, vm: str, type_: str = "backup") -> Job:
    j = a.enqueue(type_, vm, "local", None, "h1", {}, None, "test")
    assert j is not None
    return j


def test_event_lines_are_parsed_defensively() -> None:
    assert _event('{"type": "end", "outcome": "ok"}') == {"type": "end", "outcome": "ok"}
    for line in ["plain", "{broken", '{"no": "type"}', "[1, 2]", '{"type": 3}']:
        assert _event(line) is None


def test_a_job_records_events_log_and_result(tmp_path: Path) -> None:
    a = make_agent(tmp_path, ["vm1"])
    j = queue(a, "vm1")
    done = asyncio.run(a.runner.run(j))
    assert done.state == "ok" and done.exit_code == 0
    assert done.bytes == 1234 and done.snapshot == "ab12cd34"
    evs = [e for _, e in a.history.events(j.id)]
    assert [e["type"] for e in evs] == ["start", "progress", "progress", "progress", "end"]
    assert all(e["job"] == j.id for e in evs)  # VMDR_JOB_ID reached the job
    lines = [line for _, line in a.history.logs(j.id)]
    assert lines == ["vmdr: a plain log line for vm1", "{not json either"]


def test_a_failed_job_keeps_its_error_and_raises_one_alert(tmp_path: Path) -> None:
    a = make_agent(tmp_path, ["vm-fail"])
    for _ in range(2):
        done = asyncio.run(a.runner.run(queue(a, "vm-fail")))
        assert done.state == "failed" and done.exit_code == 10
        assert done.error == "disk vda: read failed"
    firing = a.history.alerts("firing")
    assert [x["kind"] for x in firing] == ["job_failed"]  # de-duplicated
    assert len(a.alerter.sent) == 1


def test_kill_9_of_a_job_is_recorded_and_the_agent_goes_on(tmp_path: Path) -> None:
    a = make_agent(tmp_path, ["vm-slow", "vm2"])

    async def scenario() -> tuple[Job, Job]:
        slow = queue(a, "vm-slow")
        task = asyncio.create_task(a.runner.run(slow))
        for _ in range(100):
            j = a.history.job(slow.id)
            if j and j.state == "running" and a.history.events(slow.id):
                break
            await asyncio.sleep(0.05)
        assert j is not None and j.pid
        os.kill(j.pid, signal.SIGKILL)
        killed = await task
        after = await a.runner.run(queue(a, "vm2"))
        return killed, after

    killed, after = asyncio.run(scenario())
    assert killed.state == "failed" and killed.error == "killed by signal SIGKILL"
    assert after.state == "ok"


def test_restart_marks_running_jobs_interrupted(tmp_path: Path) -> None:
    a = make_agent(tmp_path, ["vm1"])
    j = queue(a, "vm1")
    assert a.history.start_job(j.id, 999999, time.time())
    b = make_agent(tmp_path, ["vm1"])  # a new agent on the same state file
    b.recover()
    got = b.history.job(j.id)
    assert got is not None and got.state == "interrupted" and got.ended


def test_the_loop_fires_a_minutely_schedule_then_copies(tmp_path: Path) -> None:
    """The clock starts 2 s before a minute boundary; the first cycle records the schedule,
    the boundary fires one backup per VM, each success queues its copy."""
    base = (time.time() // 60 + 1) * 60 - 2
    t0 = time.monotonic()
    a = make_agent(tmp_path, ["vm1", "vm2", "other"],
                   clock=lambda: base + (time.monotonic() - t0))

    async def scenario() -> None:
        loop = asyncio.create_task(a.run(period=0.2))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = a.history.jobs()
            if len([j for j in jobs if j.state == "ok"]) >= 4:
                break
            await asyncio.sleep(0.1)
        a.stopping.set()
        await loop

    asyncio.run(scenario())
    jobs = a.history.jobs()
    backups = [j for j in jobs if j.type == "backup"]
    copies = [j for j in jobs if j.type == "copy"]
    assert sorted(j.vm or "" for j in backups) == ["vm1", "vm2"]
    assert all(j.state == "ok" and j.scheduled_for == base + 2 for j in backups)
    assert all(j.started and j.started - (base + 2) < 2.0 for j in backups)
    assert sorted(j.vm or "" for j in copies) == ["vm1", "vm2"]
    assert all(j.args["to"] == "offsite" for j in copies)


def test_job_command_names_files_never_secrets(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    j = Job(id="x", type="backup", vm="vm1", state="queued", created=0.0, repository="local")
    argv = job_command(cfg, j)
    assert argv[argv.index("--repo") + 1] == f"{tmp_path}/repo"
    assert argv[argv.index("--password-file") + 1] == f"{tmp_path}/pw"
    assert argv[-4:] == ["backup", "vm1", "--mode", "auto"] or "backup" in argv
    c = Job(id="y", type="copy", vm="vm1", state="queued", created=0.0, repository="local",
            args={"to": "offsite"})
    assert "--to" in job_command(cfg, c)
    v = Job(id="v1", type="verify", vm="vm1", state="queued", created=0.0,
            repository="local", args={"boot": True})
    argv = job_command(cfg, v)
    assert argv[argv.index("--evidence-dir") + 1] == f"{tmp_path}/evidence/v1"
    p = Job(id="z", type="prune", vm=None, state="queued", created=0.0, repository="local",
            args={"keep": {"daily": 7}})
    assert job_command(cfg, p)[-3:] == ["--prune", "--keep-daily", "7"]


def test_history_retention_drops_old_jobs_with_their_events(tmp_path: Path) -> None:
    h = History(f"sqlite:///{tmp_path}/h.db")
    old = Job(id="old", type="backup", vm="v", state="ok", created=1.0, ended=2.0)
    new = Job(id="new", type="backup", vm="v", state="ok", created=1e9, ended=1e9)
    h.add_job(old)
    h.add_job(new)
    h.add_event("old", {"type": "end"}, 2.0)
    h.add_log("old", "line", 2.0)
    assert h.expire(1000.0) == 1
    assert h.job("old") is None and h.events("old") == [] and h.logs("old") == []
    assert h.job("new") is not None


def test_runner_records_a_command_that_cannot_start(tmp_path: Path) -> None:
    h = History(f"sqlite:///{tmp_path}/h.db")
    r = Runner(h, lambda j: ["/nonexistent/vmdr"])
    j = Job(id="n", type="backup", vm="v", state="queued", created=time.time())
    h.add_job(j)
    done = asyncio.run(r.run(j))
    assert done.state == "failed" and "cannot start" in (done.error or "")


@pytest.mark.parametrize("n", [1])
def test_jobs_cli_lists_the_history(tmp_path: Path, n: int, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    from vmdr.cli.main import main

    a = make_agent(tmp_path, ["vm1"])
    j = asyncio.run(a.runner.run(queue(a, "vm1")))
    cfgfile = str(tmp_path / "vmdr.toml")
    assert main(["--config", cfgfile, "jobs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == [j.id] and rows[0]["state"] == "ok"
    assert main(["--config", cfgfile, "jobs", "show", j.id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["events"][-1]["type"] == "end" and shown["log"]
    assert main(["--config", cfgfile, "jobs", "show", "nope"]) == 2
    assert main(["--config", cfgfile, "jobs"]) == 0
    assert "vm1" in capsys.readouterr().out


def test_coordination_store_down_keeps_own_policies_and_never_doubles(tmp_path: Path) -> None:
    """etcd unreachable: the host's own policy (hosts = [this host]) goes on from its last
    known state and says so; the fleet's policy waits; when the store is back, the same
    occurrence is not queued twice."""
    from vmdr.agent.coord import Embedded, Member

    class Flaky(Embedded):
        name = "flaky"
        broken = False

        def tick(self, me: Member, now: float) -> bool:
            if self.broken:
                raise ConnectionError("etcd: connection refused")
            return super().tick(me, now)

    base = (time.time() // 60) * 60 + 30  # xx:xx:30
    t = [base]
    a = make_agent(tmp_path, ["vm1", "vm2"], clock=lambda: t[0], extra="""
[policies.own]
vms = ["vm1"]
hosts = ["h1"]
schedule = "minutely"
repository = "local"
""")
    a.cfg.policies["demo"].vms = ["vm2"]
    coord = Flaky(a.history)
    a.coord = coord

    async def scenario() -> None:
        await a.cycle()  # records both schedules at xx:xx:30
        coord.broken = True
        t[0] = base + 35  # past the next minute
        await a.cycle()
        assert a.scheduling_note and "own" in a.scheduling_note
        assert "demo" not in a.scheduling_note.split(";")[1]
        coord.broken = False
        t[0] = base + 40
        await a.cycle()
        await asyncio.gather(*a.tasks)

    asyncio.run(scenario())
    jobs = [j for j in a.history.jobs() if j.type == "backup"]
    own = [j for j in jobs if j.policy == "own"]
    fleet = [j for j in jobs if j.policy == "demo"]
    assert len(own) == 1 and own[0].scheduled_for == base + 30  # once, while isolated
    assert own[0].created == base + 35
    assert len(fleet) == 1 and fleet[0].created == base + 40  # after the store came back
