"""``vmdr backup VM --json-events`` and ``vmdr restore … --json-events`` against a real
running guest: the event stream the agent will parse, line by line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.guest.estate import TestVM

from .vmtools import repo_env, vmdr

pytestmark = pytest.mark.vm


def _events(stderr: str) -> list[dict[str, Any]]:
    evs = [json.loads(line) for line in stderr.splitlines()]  # every line one object
    assert evs[0]["type"] == "start" and evs[-1]["type"] == "end"
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    return evs


def test_backup_and_restore_events(live_vm: TestVM, tmp_path: Path) -> None:
    env = dict(repo_env(tmp_path), VMDR_JOB_ID="agent-job-1")
    p = vmdr(env, "backup", live_vm.name, "--json", "--json-events")
    evs = _events(p.stderr)
    assert {e["job"] for e in evs} == {"agent-job-1"}
    assert evs[0]["kind"] == "backup" and evs[0]["args"]["vms"] == [live_vm.name]
    phases = [e["phase"] for e in evs if e["type"] == "phase"]
    assert phases == ["prepare", "snapshot", "read", "commit"]
    read = next(e for e in evs if e["type"] == "phase" and e["phase"] == "read")
    assert read["item"] == live_vm.name and "(full, checkpoint, quiesced)" in read["message"]
    final = {e["item"]: e for e in evs if e["type"] == "progress" and e["final"]}
    assert set(final) == {f"{live_vm.name}/vda", f"{live_vm.name}/vdb"}
    assert all(e["done"] == e["total"] > 0 for e in final.values())
    end = evs[-1]
    assert end["outcome"] == "ok" and end["result"] == json.loads(p.stdout)
    (res,) = end["result"]["results"]
    assert res["status"] == "ok" and res["bytes_read"] == sum(e["done"]
                                                               for e in final.values())

    target = live_vm.images.vms_dir / f"{live_vm.name}-events"
    try:
        p = vmdr(env, "restore", live_vm.name, "--target-dir", str(target), "--name",
                 f"{live_vm.name}-ev", "--format", "raw", "--json-events")
        evs = _events(p.stderr)
        assert p.stdout.startswith(f"restored {live_vm.name}@")
        assert evs[0]["kind"] == "restore"
        prog = [e for e in evs if e["type"] == "progress"]
        assert {e["item"] for e in prog} == {f"{live_vm.name}-ev/vda", f"{live_vm.name}-ev/vdb"}
        assert sum(e["done"] for e in prog if e["final"]) == sum(
            Path(f).stat().st_size for f in evs[-1]["result"]["disks"].values())
        assert evs[-1]["outcome"] == "ok" and evs[-1]["exit_code"] == 0

        # a failing job still ends its stream, with the error's exit code
        p = vmdr(env, "restore", live_vm.name, "--target-dir", str(target), "--name",
                 f"{live_vm.name}-ev", "--format", "raw", "--json-events", code=2)
        evs = _events(p.stderr)
        assert [e["type"] for e in evs] == ["start", "error", "end"]
        assert evs[-1]["exit_code"] == 2 and "--force" in evs[-1]["message"]
    finally:
        shutil.rmtree(target, ignore_errors=True)
