"""A supervised mirror runs for days: it has its own per-host limit (``max_mirrors``) and
takes none of the ``max_jobs`` slots that backups, copies and replica cycles share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_mirror_state import CFG, cfg_of
from vmdr.agent import scheduler as sched
from vmdr.agent.history import Job
from vmdr.errors import ConfigError


def mirror(i: int, state: str = "running", mode: str = "mirror") -> Job:
    return Job(f"m{i}", "replicate", f"db{i}", state, float(i), repository="",
               args={"mode": mode, "not_before": 0.0})


def job(id_: str, type_: str, vm: str, created: float, **args: object) -> Job:
    return Job(id_, type_, vm, "queued", created, repository="local",
               args={"not_before": 0.0, **args})


def test_running_mirrors_take_no_max_jobs_slot() -> None:
    running = [mirror(1), mirror(2, mode="sync")]
    queued = [job("b1", "backup", "web1", 1.0), job("c1", "replicate", "web2", 2.0,
                                                     mode="snapshot")]
    go = sched.startable(queued, running, 10.0, max_jobs=2, repository_jobs=2)
    # two mirrors run and max_jobs is 2: the backup and the replica cycle still start
    assert [j.id for j in go] == ["b1", "c1"]
    # a third ordinary job waits for a slot
    go = sched.startable([*queued, job("b2", "backup", "web3", 3.0)], running, 10.0,
                         max_jobs=2, repository_jobs=5)
    assert [j.id for j in go] == ["b1", "c1"]


def test_mirrors_have_their_own_limit() -> None:
    running = [mirror(i) for i in range(3)]
    queued = [mirror(i, "queued") for i in range(3, 6)] + [job("b1", "backup", "web1", 9.0)]
    go = sched.startable(queued, running, 10.0, max_jobs=1, repository_jobs=1,
                         max_mirrors=4)
    # one more mirror fits (4 - 3), the backup has its own slot behind the queued mirrors
    assert [j.id for j in go] == ["m3", "b1"]
    go = sched.startable(queued, running, 10.0, max_jobs=1, repository_jobs=1,
                         max_mirrors=3)
    assert [j.id for j in go] == ["b1"]
    # nothing of either kind fits: the scan stops
    full = [*running, Job("x", "backup", "web9", "running", 0.0, repository="local")]
    assert sched.startable(queued, full, 10.0, max_jobs=1, repository_jobs=1,
                           max_mirrors=3) == []


def test_replica_cycles_still_count_against_max_jobs() -> None:
    running = [Job("c0", "replicate", "web0", "running", 0.0, repository="",
                   args={"mode": "snapshot"})]
    queued = [job("c1", "replicate", "web1", 1.0, mode="snapshot"), mirror(7, "queued")]
    go = sched.startable(queued, running, 10.0, max_jobs=1, repository_jobs=1)
    assert [j.id for j in go] == ["m7"]
    assert not sched.is_mirror(running[0]) and sched.is_mirror(queued[1])


def test_max_mirrors_in_the_config(tmp_path: Path) -> None:
    assert cfg_of(CFG, tmp_path).agent.max_mirrors == 8
    cfg = cfg_of(CFG.replace("[agent]\n", "[agent]\nmax_mirrors = 2\n"), tmp_path)
    assert cfg.agent.max_mirrors == 2
    with pytest.raises(ConfigError, match=r"max_mirrors"):
        cfg_of(CFG.replace("[agent]\n", "[agent]\nmax_mirrors = -1\n"), tmp_path)
