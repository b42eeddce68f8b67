"""Continuous replication's pure parts: SLA states in Zerto's sense, the supervisor's
verdicts on the mirror jobs, its back-off, the ``replicate`` policy kind in the agent's
scheduler and the job command it becomes, and the mirror on the fake driver."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from vmdr import config
from vmdr.agent import scheduler as sched
from vmdr.agent.history import Job
from vmdr.agent.runner import job_command
from vmdr.errors import ConfigError, IntegrityError
from vmdr.jobs.mirror_state import (
    COPYING,
    ERROR,
    FALLBACK,
    LABELS,
    MIRRORING,
    PAUSED,
    STOPPED,
    MirrorState,
    Progress,
    achieved_rpo,
    assess,
    retry_delay,
    sla_state,
)
from vmdr.jobs.replicate_state import (
    INITIALIZING,
    MEETING,
    NO_TARGET,
    NOT_MEETING,
    Cycle,
    ReplicaState,
    RestorePoint,
)

NOW = dt.datetime(2026, 12, 6, 4, 0, 0, tzinfo=dt.UTC)


def ago(s: float) -> str:
    return (NOW - dt.timedelta(seconds=s)).isoformat()


def replica(point_age: float | None, *, failed: bool = False) -> ReplicaState:
    st = ReplicaState(vm="web", source_uri="qemu:///system", source_uuid="u", standby="s",
                      standby_uuid="v", target_uri="qemu+ssh://dr/system", directory="/r/web",
                      prefix="vmdr-replica-0")
    if point_age is not None:
        st.points = [RestorePoint("rp-1", ago(point_age), "direct", "incremental")]
    st.cycles = [Cycle(ago(10), 1.0, "direct", "none" if failed else "incremental",
                       error="DR host unreachable" if failed else None)]
    return st


def mirror(state: str, in_sync_age: float | None, since_age: float = 100) -> MirrorState:
    return MirrorState("web", "mirror", state=state, since=ago(since_age),
                       in_sync_at=None if in_sync_age is None else ago(in_sync_age))


@pytest.mark.parametrize(("st", "ms", "target", "want", "rpo"), [
    (None, None, 60.0, INITIALIZING, None),
    (replica(30), None, 60.0, MEETING, 30.0),
    (replica(300), None, 60.0, NOT_MEETING, 300.0),
    (replica(300), None, None, NO_TARGET, 300.0),
    # the mirror's last in-sync instant wins over an old point
    (replica(3600), mirror(MIRRORING, 2), 10.0, MEETING, 2.0),
    # a mirror whose supervisor stopped reporting ages like a point
    (replica(3600), mirror(MIRRORING, 40), 10.0, NOT_MEETING, 40.0),
    # mirror fell back, and the snapshot cycle failed too: nothing is replicating
    (replica(900, failed=True), mirror(FALLBACK, 800), 60.0, ERROR, 800.0),
    # fell back but the cycle failed only a moment ago: still within target
    (replica(30, failed=True), mirror(FALLBACK, 50), 60.0, MEETING, 30.0),
    # stopped by the operator and no point since: paused
    (replica(900), mirror(STOPPED, 900, since_age=800), 60.0, PAUSED, 900.0),
    # stopped, but snapshot cycles go on: judged by them
    (replica(20), mirror(STOPPED, 900, since_age=800), 60.0, MEETING, 20.0),
])
def test_sla_states(st: ReplicaState | None, ms: MirrorState | None, target: float | None,
                    want: str, rpo: float | None) -> None:
    state, age = sla_state(st, ms, NOW, target)
    assert (state, age) == (want, rpo)
    assert LABELS[state]


def test_zerto_labels() -> None:
    assert [LABELS[s] for s in (MEETING, NOT_MEETING, ERROR, PAUSED)] == [
        "Meeting SLA", "RPO Not Meeting SLA", "Error", "Paused"]


def test_achieved_rpo_without_anything() -> None:
    assert achieved_rpo(None, None, NOW) is None
    assert achieved_rpo(replica(None), mirror(COPYING, None), NOW) is None


def test_mirror_state_round_trip_and_transitions() -> None:
    ms = MirrorState("web", "sync")
    ms.move(COPYING, NOW)
    ms.move(MIRRORING, NOW)
    ms.move(FALLBACK, NOW, "link down")
    back = MirrorState.from_json(ms.to_json(), "x")
    assert back == ms and back.error == "link down" and back.since == NOW.isoformat()
    assert [e["state"] for e in back.events] == [COPYING, MIRRORING, FALLBACK]
    # a newer writer's extra keys are ignored, garbage is an IntegrityError
    assert MirrorState.from_json(b'{"vm": "a", "mode": "mirror", "new": 1}', "x").vm == "a"
    with pytest.raises(IntegrityError):
        MirrorState.from_json(b"[]", "x")


def test_assess_in_step_copying_and_aborts() -> None:
    prog: dict[str, Progress] = {}
    assert assess([("vda", 10, 10, True), ("vdb", 5, 5, True)], True, prog, 0, 10) == \
        (MIRRORING, None)
    assert assess([("vda", 10, 20, True)], True, prog, 1, 10) == (COPYING, None)
    # progress keeps it alive
    assert assess([("vda", 15, 20, True)], True, prog, 9, 10)[0] == COPYING
    # behind without progress past the stall limit: abort
    verdict, why = assess([("vda", 15, 20, True)], True, prog, 25, 10)
    assert verdict == "abort" and "no progress" in str(why)
    # in step (sync mode: cur == end) never counts as stalled
    prog2: dict[str, Progress] = {}
    for t in range(0, 100, 10):
        assert assess([("vda", 7, 7, True)], True, prog2, t, 5)[0] == MIRRORING
    verdict, why = assess([("vda", 7, 7, False)], True, prog2, 101, 5)
    assert verdict == "abort" and "ended" in str(why)
    verdict, why = assess([("vda", 7, 7, True)], False, prog2, 102, 5)
    assert verdict == "abort" and "link" in str(why)


def test_retry_backoff() -> None:
    assert [retry_delay(n, 30) for n in range(5)] == [0, 30, 60, 120, 240]
    assert retry_delay(20, 30) == 600


# -- the agent: a policy kind ``replicate`` ---------------------------------------------------

CFG = """
connect = "qemu:///system"

[repositories.local]
url = "/srv/vmdr"

[agent]
state = "/var/lib/vmdr/agent.db"

[policies.nightly]
schedule = "daily 02:00"
repository = "local"

[policies.hot]
kind = "replicate"
vms = ["db*"]
schedule = "minutely"
mode = "sync"
to = "qemu+ssh://root@dr1/system"
rpo = "30s"

[policies.warm]
kind = "replicate"
vms = ["web*"]
schedule = "*:0/5"
"""


def cfg_of(text: str, tmp_path: Path) -> config.Config:
    p = tmp_path / "vmdr.toml"
    p.write_text(text)
    return config.load(str(p))


def test_replicate_policies_schedule_jobs(tmp_path: Path) -> None:
    cfg = cfg_of(CFG, tmp_path)
    keys = [s.key for s in sched.schedules(cfg)]
    assert keys == ["hot:replicate", "nightly:backup", "warm:replicate"]
    hot = next(s for s in sched.schedules(cfg) if s.key == "hot:replicate")
    now = dt.datetime(2026, 12, 6, 4, 0, 30, tzinfo=dt.UTC)
    (f,) = sched.due([hot], {hot.key: now.timestamp() - 60}, now)
    vms = [sched.VMInfo("db1", "h1"), sched.VMInfo("web1", "h1"), sched.VMInfo("db2", "h2")]
    specs = sched.expand(cfg, f, vms, "h1")
    assert [(s.type, s.vm, s.host) for s in specs] == [("replicate", "db1", "h1"),
                                                        ("replicate", "db2", "h2")]
    assert specs[0].args == {"mode": "sync", "to": "qemu+ssh://root@dr1/system", "rpo": 30.0}
    job = Job("j1", "replicate", "db1", "queued", 0.0, policy="hot", repository="",
              args=specs[0].args)
    cmd = job_command(cfg, job)
    i = cmd.index("replicate")
    assert cmd[i:] == ["replicate", "db1", "--connect", "qemu:///system", "--to",
                       "qemu+ssh://root@dr1/system", "--rpo", "30s", "--mode", "sync",
                       "--exit-on-abort"]
    warm = Job("j2", "replicate", "web1", "queued", 0.0, policy="warm", repository="",
               args={"mode": "snapshot", "to": None, "rpo": None})
    assert job_command(cfg, warm)[-2:] == ["--mode", "snapshot"]


def test_long_running_mirrors_do_not_use_repository_slots() -> None:
    running = [Job(f"m{i}", "replicate", f"db{i}", "running", 0.0, repository="local")
               for i in range(3)]
    queued = [Job("b", "backup", "web", "queued", 1.0, repository=""),
              Job("m9", "replicate", "db0", "queued", 2.0, repository="")]
    go = sched.startable(queued, running, 10.0, max_jobs=5, repository_jobs=1)
    # the backup starts (its repository has no job), db0's restart waits for its mirror
    assert [j.id for j in go] == ["b"]


@pytest.mark.parametrize(("extra", "key"), [
    ('[policies.x]\nkind = "replicate"\nschedule = "minutely"\nmode = "fast"\n',
     "policies.x.mode"),
    ('[policies.x]\nkind = "replicate"\nschedule = "minutely"\nkeep_daily = 3\n',
     "policies.x.keep_daily"),
    ('[policies.x]\nkind = "mirror"\nschedule = "minutely"\n', "policies.x.kind"),
])
def test_bad_replicate_policies(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_of(CFG + extra, tmp_path)
