"""Issue 14, item 1: a retention typo must never delete every backup."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmdr.errors import UsageError
from vmdr.repository import retention
from vmdr.repository.manifest import Snapshot
from vmdr.repository.retention import parse_duration

from .hardening_helpers import cli_env, empty_snapshot, make_repo, vmdr
from .repofixtures import FakeClock

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _snap(name: str, t: datetime) -> Snapshot:
    s = Snapshot(name, t, 65536)
    s.id = f"{name}-{t.isoformat()}"
    return s


@pytest.mark.parametrize("field", retention.COUNTS)
def test_policy_refuses_negative_counts(field: str) -> None:
    with pytest.raises(UsageError, match=f"keep-{field}"):
        retention.Policy(**{field: -1})  # type: ignore[arg-type]


def test_policy_refuses_bad_within() -> None:
    for bad in (timedelta(0), timedelta(days=-1), timedelta(days=1000 * 366)):
        with pytest.raises(UsageError, match="keep-within"):
            retention.Policy(within=bad)


def test_apply_refuses_to_empty_a_name() -> None:
    snaps = [_snap("a", T0 + timedelta(days=i)) for i in range(3)] + [_snap("b", T0)]
    now = T0 + timedelta(days=400)
    with pytest.raises(UsageError, match="every snapshot of 'a', 'b'"):
        retention.apply(snaps, retention.Policy(within=timedelta(days=7)), now)
    ds = retention.apply(snaps, retention.Policy(within=timedelta(days=7)), now,
                         allow_empty=True)
    assert not any(d.keep for d in ds)
    # one name kept by a protection is not emptied
    ds = retention.apply(snaps[:3], retention.Policy(within=timedelta(days=7)), now,
                         lambda s: s is snaps[0])
    assert [d.keep for d in ds] == [False, False, True]


def test_parse_duration_edges() -> None:
    assert parse_duration("0") == timedelta(0)
    assert parse_duration("0s") == timedelta(0)
    assert parse_duration("1s") == timedelta(seconds=1)
    assert parse_duration("1y6M") == timedelta(days=365 + 180)
    for bad in ("99999999999y", "1000000000000000000000s", "1001y", "-1d", "1.5h", "s"):
        with pytest.raises(UsageError):
            parse_duration(bad)


@pytest.mark.parametrize("args", [
    ["--keep-last", "-1"], ["--keep-daily", "-3"], ["--keep-last", "0"],
    ["--keep-weekly", "x"], ["--keep-yearly", "1.5"],
    ["--keep-within", "99999999999y"], ["--keep-within=-7d"], ["--keep-within", "0"],
])
def test_cli_refuses_bad_retention(tmp_path: Path, args: list[str]) -> None:
    env = cli_env(tmp_path)
    with make_repo(env["VMDR_REPO"]) as r:
        for i in range(3):
            empty_snapshot(r, "vm1", T0 + timedelta(days=i))
    p = vmdr("forget", *args, env=env, code=2)
    assert "positive" in p.stderr or "duration" in p.stderr
    assert len(json.loads(vmdr("snapshots", "--json", env=env).stdout)) == 3


def test_cli_forget_refuses_to_empty_a_name(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    with make_repo(env["VMDR_REPO"], clock=FakeClock(T0)) as r:
        for i in range(3):
            empty_snapshot(r, "vm1", T0 + timedelta(days=i))
        empty_snapshot(r, "vm2", datetime.now(UTC))
    p = vmdr("forget", "--keep-within", "7d", env=env, code=2)
    assert "'vm1'" in p.stderr and "--allow-empty" in p.stderr
    assert len(json.loads(vmdr("snapshots", "--json", env=env).stdout)) == 4
    vmdr("forget", "--keep-within", "7d", "--allow-empty", env=env)
    left = json.loads(vmdr("snapshots", "--json", env=env).stdout)
    assert [s["name"] for s in left] == ["vm2"]


def test_cli_safety_window_accepts_seconds(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    make_repo(env["VMDR_REPO"]).close()
    for w in ("0", "0s", "1s", "90m", "2h"):
        vmdr("prune", "--safety-window", w, "--dry-run", env=env)
    vmdr("prune", "--safety-window", "5", env=env, code=2)
