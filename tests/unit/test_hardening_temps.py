"""Issue 14, should-fix: temporary objects left by killed writes are reported by
``check`` (kind ``stale-temp``, format.md §1) and removed by ``prune`` once older than
the safety window."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from .hardening_helpers import cli_env, empty_snapshot, make_repo, vmdr

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _leave_temp(repo_dir: Path, rel: str, age_s: float) -> Path:
    p = repo_dir / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"half an object")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_check_reports_and_prune_removes_stale_temps(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    repo = Path(env["VMDR_REPO"])
    with make_repo(str(repo)) as r:
        empty_snapshot(r, "vm", T0)
    old = _leave_temp(repo, "data/ab/" + "ab" * 32 + ".0123456789ab.tmp", 3 * 86400)
    old_snap = _leave_temp(repo, "snapshots/" + "cd" * 32 + ".0123456789ab.tmp", 86400)
    young = _leave_temp(repo, "data/ef/" + "ef" * 32 + ".0123456789ab.tmp", 60)
    res = json.loads(vmdr("check", "--json", env=env).stdout)
    assert res["ok"]  # harmless: reported, not a failure
    stale = {w["object"] for w in res["warnings"] if w["kind"] == "stale-temp"}
    assert stale == {str(old.relative_to(repo)), str(old_snap.relative_to(repo))}
    assert "stale-temp" in vmdr("check", env=env).stdout
    # prune: only those older than the safety window
    p = json.loads(vmdr("prune", "--safety-window", "2d", "--json", env=env).stdout)
    assert p["stale_temporaries"] == 1
    assert not old.exists() and old_snap.exists() and young.exists()
    vmdr("prune", "--safety-window", "0", env=env)
    assert not old_snap.exists() and not young.exists()
    assert json.loads(vmdr("snapshots", "--json", env=env).stdout)[0]["name"] == "vm"
