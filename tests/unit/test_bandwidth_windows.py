"""Bandwidth windows: the rule syntax, which rule covers a time, a bucket whose rate follows
the clock, and how a policy's windows reach its backup and copy jobs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.unit.test_agent_runner import make_cfg
from vmdr.agent.history import Job
from vmdr.agent.runner import job_command
from vmdr.agent.scheduler import schedules
from vmdr.errors import ConfigError, UsageError
from vmdr.storage.throttle import TokenBucket, WindowedBucket, Windows, bucket_for, parse_window

MIB = 1 << 20


def at(day: int, hh: int, mm: int = 0) -> dt.datetime:
    """Day 0 = Monday 2026-11-30."""
    return dt.datetime(2026, 11, 30, hh, mm) + dt.timedelta(days=day)


def test_rules_and_which_one_covers_a_time() -> None:
    w = Windows(["mon..fri 08:00..18:00 20MiB/s", "sat,sun 5M", "* 100M"])
    assert w.rate_at(at(0, 8)) == 20 * MIB  # Monday 08:00: the window opens
    assert w.rate_at(at(4, 17, 59)) == 20 * MIB
    assert w.rate_at(at(4, 18)) == 100 * MIB  # Friday 18:00: it has closed
    assert w.rate_at(at(0, 7, 59)) == 100 * MIB
    assert w.rate_at(at(5, 12)) == 5 * MIB and w.rate_at(at(6, 23, 59)) == 5 * MIB
    assert str(w) == "mon..fri 08:00..18:00 20MiB/s; sat,sun 5M; * 100M"


def test_windows_past_midnight_and_around_the_week() -> None:
    night = parse_window("fri 22:00..06:00 unlimited")
    assert night.covers(at(4, 23)) and night.covers(at(5, 5, 59))  # Fri night → Sat early
    assert not night.covers(at(5, 6)) and not night.covers(at(4, 21))
    assert not night.covers(at(0, 3))  # Monday early belongs to Sunday night: not Friday's
    weekend = parse_window("fri..mon 10M")  # a range that wraps the week
    assert {d for d in range(7) if weekend.covers(at(d, 12))} == {0, 4, 5, 6}
    assert parse_window("18:00..24:00 1M").covers(at(2, 23, 59))
    pbs = parse_window("mon..fri 14:30-18 2M")  # Proxmox Backup Server's timeframe form
    assert pbs.covers(at(0, 14, 30)) and not pbs.covers(at(0, 18)) and pbs.rate == 2 * MIB
    w = Windows(["mon 09:00..10:00 1M"])
    assert w.rate_at(at(1, 9, 30)) is None  # no rule covers it: unlimited


@pytest.mark.parametrize("rule, message", [
    ("", "at least one rule"), ("fast", "invalid rate"), ("mon..fri 08:00..18:00", "invalid rate"),
    ("someday 1M", "not a day"), ("mon 25:00..26:00 1M", "not a time"),
    ("mon 08:00..18:00 1M extra", "expected"), ("* 0", "too low"),
])
def test_bad_rules_say_what_is_wrong(rule: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Windows.parse(rule)


def test_the_bucket_follows_the_clock() -> None:
    now = [at(0, 7, 59, )]
    mono = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        mono[0] += s

    b = WindowedBucket(Windows(["mon..fri 08:00..18:00 1M", "* unlimited"]),
                       now=lambda: now[0], clock=lambda: mono[0], sleep=sleep)
    assert b.current is None and b.take(50 * MIB) == 0.0  # before 08:00: free
    now[0] = at(0, 8)
    mono[0] += 1.0
    b.take(256 << 10)  # the burst
    waited = sum(b.take(64 << 10) for _ in range(16))  # 1 MiB more at 1 MiB/s
    assert b.current == MIB and 0.9 <= waited <= 1.1
    now[0] = at(0, 18)
    mono[0] += 1.0
    assert b.take(100 * MIB) == 0.0 and b.current is None


def test_bwlimit_takes_a_rate_or_windows() -> None:
    assert type(bucket_for("10M")) is TokenBucket
    assert isinstance(bucket_for("mon..fri 08:00..18:00 20M; * 100M"), WindowedBucket)
    assert isinstance(bucket_for("unlimited"), WindowedBucket)
    with pytest.raises(UsageError):
        bucket_for("mon..fri 20M; garbage")


POLICY = """
[policies.office]
vms = ["db*"]
schedule = "daily 02:00"
repository = "local"
copy = ["offsite"]
bandwidth = ["mon..fri 08:00..18:00 20MiB/s", "* 100MiB/s"]
"""


def test_a_policy_passes_its_windows_to_backup_and_copy_jobs(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, POLICY)
    schedules(cfg)  # valid
    windows = "mon..fri 08:00..18:00 20MiB/s; * 100MiB/s"

    def argv(type_: str, policy: str, **args: object) -> list[str]:
        return job_command(cfg, Job("j1", type_, "db1", "queued", 0.0, policy=policy,
                                    repository="local", args=dict(args)))

    for cmd in (argv("backup", "office"), argv("copy", "office", to="offsite")):
        i = cmd.index("--bwlimit")
        assert cmd[i + 1] == windows
        assert cmd[i - 1] != "--bwlimit"
    assert "--bwlimit" not in argv("verify", "office")
    assert "--bwlimit" not in argv("backup", "demo")  # a policy with no windows
    one = make_cfg(tmp_path, POLICY.replace(
        'bandwidth = ["mon..fri 08:00..18:00 20MiB/s", "* 100MiB/s"]', 'bandwidth = "5M"'))
    assert one.policies["office"].bandwidth == ["5M"]


def test_a_bad_window_stops_the_agent_at_start(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, POLICY.replace("20MiB/s", "lots"))
    with pytest.raises(ConfigError, match=r"policies\.office\.bandwidth: .*lots"):
        schedules(cfg)
