"""The scheduler as pure functions: catch-up once, compare-and-set, jitter, limits, RPO."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from vmdr import config
from vmdr.agent import scheduler as sched
from vmdr.agent.calendar import CalendarError
from vmdr.agent.history import History, Job
from vmdr.errors import ConfigError

UTC = dt.UTC
SMALLEST = """
connect = "qemu:///system"

[repositories.local]
url = "/srv/vmdr"
password_file = "/etc/vmdr/passphrase"

[agent]
listen = "127.0.0.1:8780"
state = "/var/lib/vmdr/agent.db"

[policies.nightly]
vms = ["*"]            # name globs
schedule = "daily 02:00"
repository = "local"
"""


def cfg_of(text: str, tmp_path: Path) -> config.Config:
    p = tmp_path / "vmdr.toml"
    p.write_text(text)
    return config.load(str(p))


def test_the_smallest_config_works_as_written(tmp_path: Path) -> None:
    cfg = cfg_of(SMALLEST, tmp_path)
    assert cfg.agent.listen == "127.0.0.1:8780" and cfg.agent.state == "/var/lib/vmdr/agent.db"
    assert cfg.repositories["local"].password_file == "/etc/vmdr/passphrase"
    (s,) = sched.schedules(cfg)
    assert s.key == "nightly:backup"
    nxt = s.event.next_after(dt.datetime(2026, 1, 1, 3, 0, tzinfo=UTC))
    assert nxt == dt.datetime(2026, 1, 2, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(("extra", "key"), [
    ('[policies.x]\nschedule = "daily"\nrepository = "nowhere"\n', "policies.x.repository"),
    ('[policies.x]\nrepository = "local"\n', "policies.x.schedule"),
    ('[policies.x]\nschedule = "daily"\nrepository = "local"\nkeep_daily = -1\n',
     "policies.x.keep_daily"),
    ('[policies.x]\nschedule = "daily"\nrepository = "local"\njitter = "soon"\n',
     "policies.x.jitter"),
    ('[policies.x]\nschedule = "daily"\nrepository = "local"\nfrequency = 1\n',
     "policies.x.frequency"),
    ('[agent.alerts]\nsmtp_port = "x"\n', "agent.alerts.smtp_port"),
])
def test_bad_policy_config_names_the_key(tmp_path: Path, extra: str, key: str) -> None:
    text = SMALLEST.replace('[policies.nightly]', extra + '\n[policies.nightly]')
    with pytest.raises(ConfigError) as e:
        cfg_of(text, tmp_path)
    assert key in e.value.message and e.value.exit_code == 2


def test_bad_schedule_is_an_error_naming_the_policy(tmp_path: Path) -> None:
    cfg = cfg_of(SMALLEST.replace("daily 02:00", "daily 26:00"), tmp_path)
    with pytest.raises(CalendarError, match=r"policies\.nightly\.schedule"):
        sched.schedules(cfg)


def at(h: int, m: int = 0, s: int = 0, day: int = 6) -> dt.datetime:
    return dt.datetime(2026, 12, day, h, m, s, tzinfo=UTC)


def test_due_fires_once_and_catches_up_once(tmp_path: Path) -> None:
    cfg = cfg_of(SMALLEST, tmp_path)
    scheds = sched.schedules(cfg)
    # first sight: nothing fires (the daemon records now)
    assert sched.due(scheds, {}, at(3)) == []
    state = {"nightly:backup": at(1).timestamp()}
    assert sched.due(scheds, state, at(1, 59, 59)) == []
    (f,) = sched.due(scheds, state, at(2, 0, 0))
    assert f.due == at(2).timestamp() and not f.catch_up
    # down for three nights: one run, standing for the newest missed occurrence
    (f,) = sched.due(scheds, state, at(9, day=9))
    assert f.catch_up and f.due == at(2, day=9).timestamp()


def test_compare_and_set_lets_one_agent_fire(tmp_path: Path) -> None:
    h = History(f"sqlite:///{tmp_path}/h.db")
    assert h.advance_schedule("p:backup", None, 10.0)
    assert not h.advance_schedule("p:backup", None, 11.0)  # someone else created it
    assert h.advance_schedule("p:backup", 10.0, 20.0)
    assert not h.advance_schedule("p:backup", 10.0, 30.0)  # stale expectation
    assert h.schedule_state() == {"p:backup": 20.0}


def test_jitter_is_stable_and_bounded() -> None:
    vals = [sched.jitter(300, "p", f"vm{i}", "1") for i in range(200)]
    assert all(0 <= v < 300 for v in vals) and len(set(vals)) > 150
    assert sched.jitter(300, "p", "vm1", "1") == vals[1]
    assert sched.jitter(0, "p", "vm1", "1") == 0


def test_expand_selects_by_glob_tier_and_host(tmp_path: Path) -> None:
    cfg = cfg_of(SMALLEST + '\n[policies.web]\nvms = ["web*"]\ntiers = ["gold"]\n'
                 'hosts = ["h1"]\nschedule = "hourly"\nrepository = "local"\njitter = "10m"\n'
                 'copy = ["local"]\n', tmp_path)
    vms = [sched.VMInfo("web1", "h1", tier="gold"), sched.VMInfo("web2", "h2", tier="gold"),
           sched.VMInfo("web3", "h1", tier="bronze"), sched.VMInfo("db", "h1", tier="gold")]
    web = next(s for s in sched.schedules(cfg) if s.policy == "web")
    specs = sched.expand(cfg, sched.Firing(web, 1000.0, 0.0), vms, "h1")
    assert [s.vm for s in specs] == ["web1"]
    assert 1000 <= specs[0].not_before < 1600 and specs[0].args["copy"] == ["local"]


def job(i: int, vm: str | None, repo: str = "r", state: str = "queued",
        not_before: float = 0.0) -> Job:
    return Job(id=f"j{i}", type="backup", vm=vm, state=state, created=float(i),
               repository=repo, args={"not_before": not_before})


def test_startable_respects_limits_and_one_job_per_vm() -> None:
    running = [job(0, "a", state="running")]
    queued = [job(1, "a"), job(2, "b"), job(3, "c"), job(4, "d", "r2"),
              job(5, "e", not_before=100.0)]
    go = sched.startable(queued, running, 50.0, max_jobs=3, repository_jobs=2)
    assert [j.id for j in go] == ["j2", "j4"]  # a busy, r full after b, e not yet
    assert sched.startable(queued, running, 50.0, max_jobs=1, repository_jobs=9) == []
    two = [job(1, "x"), job(2, "x")]
    assert [j.id for j in sched.startable(two, [], 0.0, 5, 5)] == ["j1"]


def test_rpo_target_from_policy_vm_tier_or_schedule(tmp_path: Path) -> None:
    cfg = cfg_of(SMALLEST + '\n[plan.tiers.gold]\nrpo = "4h"\n\n[vm.db]\nrpo = "1h"\n',
                 tmp_path)
    pol = cfg.policies["nightly"]
    now = at(12)
    assert sched.rpo_target(cfg, sched.VMInfo("db", "h"), pol, now) == 3600
    assert sched.rpo_target(cfg, sched.VMInfo("x", "h", tier="gold"), pol, now) == 4 * 3600
    assert sched.rpo_target(cfg, sched.VMInfo("x", "h"), pol, now) == 2 * 86400
    pol.rpo_s = 60.0
    assert sched.rpo_target(cfg, sched.VMInfo("db", "h"), pol, now) == 60
