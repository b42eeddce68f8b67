"""``--json-events`` as the agent will use it: the real CLI in a subprocess, stderr read
line by line; every line one JSON event, framed by ``start`` and ``end`` even on failure."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmdr.cli.main import _EventLogHandler
from vmdr.events import JobEvents, JobWarning, ListSink

from .repofixtures import make_image

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def run(*args: str, env: dict[str, str], code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*VMDR, *args], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=120)
    assert p.returncode == code, f"exit {p.returncode} != {code}\n{p.stdout}\n{p.stderr}"
    return p


def events(p: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every stderr line parsed on its own; framed by start and end; seq in order."""
    evs = [json.loads(line) for line in p.stderr.splitlines()]
    assert evs[0]["type"] == "start" and evs[-1]["type"] == "end"
    assert [e["type"] for e in evs].count("end") == 1
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert len({e["job"] for e in evs}) == 1
    assert all(e["time"].endswith("Z") for e in evs)
    return evs


def types(evs: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in evs]


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "pw"
    pw.write_text("s3cret passphrase\n")
    pw.chmod(0o600)
    env = {"VMDR_REPO": str(tmp_path / "repo"), "VMDR_PASSWORD_FILE": str(pw)}
    run("repo", "init", env=env)
    return env


def test_image_backup_and_restore(tmp_path: Path, repo: dict[str, str]) -> None:
    img = tmp_path / "disk.raw"
    make_image(str(img), 9 << 20, seed=5)
    p = run("image", "backup", str(img), "--name", "vm1", "--json", "--json-events",
            env={**repo, "VMDR_JOB_ID": "agent-7"})
    evs = events(p)
    assert {e["job"] for e in evs} == {"agent-7"}
    assert evs[0]["kind"] == "image backup"
    assert evs[0]["args"] == {"force_read": False, "name": "vm1", "path": str(img), "tag": []}
    prog = [e for e in evs if e["type"] == "progress"]
    assert prog and prog[-1]["final"] and prog[-1]["done"] == prog[-1]["total"] > 0
    assert evs[-1]["outcome"] == "ok" and evs[-1]["exit_code"] == 0
    assert evs[-1]["result"] == json.loads(p.stdout)  # --json: the same document

    out = tmp_path / "out.raw"
    p = run("image", "restore", "vm1", str(out), "--json-events", "--job-id", "r1", env=repo)
    evs = events(p)
    assert p.stdout.startswith("restored vm1@")  # --json-events leaves stdout alone
    assert {e["job"] for e in evs} == {"r1"} and evs[0]["kind"] == "image restore"
    assert "progress" in types(evs) and evs[-1]["result"]["bytes_written"] > 0
    assert out.read_bytes() == img.read_bytes()


def test_failures_end_with_the_exit_code(tmp_path: Path, repo: dict[str, str]) -> None:
    p = run("image", "restore", "nosuch", str(tmp_path / "x"), "--json-events", env=repo,
            code=14)
    evs = events(p)  # and nothing but JSON on stderr: no "vmdr: error:" line
    assert types(evs) == ["start", "error", "end"]
    assert evs[-1] == {**evs[-1], "outcome": "failed", "exit_code": 14, "result": None,
                       "message": "no snapshot named 'nosuch'"}
    p = run("image", "backup", "--json-events", env=repo, code=2)  # usage error
    evs = events(p)
    assert evs[-1]["exit_code"] == 2 and "required" in evs[-1]["message"]
    p = run("snapshots", "--json-events", env={**repo, "VMDR_REPO": str(tmp_path / "none")},
            code=3)  # any command, not only jobs
    assert events(p)[-1]["message"].startswith("no vmdr repository at")


def test_maintenance_and_copy_jobs(tmp_path: Path, repo: dict[str, str]) -> None:
    img = tmp_path / "disk.raw"
    for seed in (1, 2):
        make_image(str(img), 5 << 20, seed=seed)
        run("image", "backup", str(img), "--name", "vm1", env=repo)
    dst = str(tmp_path / "dst")
    run("repo", "init", env={**repo, "VMDR_REPO": dst})
    p = run("copy", "--to", dst, "--json-events", env=repo)
    evs = events(p)
    assert evs[0]["kind"] == "copy" and evs[0]["args"]["to"] == dst
    prog = [e for e in evs if e["type"] == "progress"]
    assert prog[-1]["item"] == "copy" and prog[-1]["done"] == prog[-1]["total"] > 0
    assert len(evs[-1]["result"]["snapshots"]) == 2

    p = run("verify", "vm1", "--json-events", env=repo)
    evs = events(p)
    assert [e["phase"] for e in evs if e["type"] == "phase"] == ["data"]
    assert [e["final"] for e in evs if e["type"] == "progress"][-1] is True
    assert evs[-1]["result"]["status"] == "passed"

    p = run("check", "--read-data", "--json-events", env=repo)
    evs = events(p)
    assert types(evs)[:3] == ["start", "phase", "progress"] and evs[-1]["result"]["ok"]
    p = run("forget", "--keep-last", "1", "--prune", "--json-events", env=repo)
    evs = events(p)
    assert [e["phase"] for e in evs if e["type"] == "phase"] == ["plan", "forget", "prune"]
    assert evs[-1]["result"]["prune"] is not None
    assert sorted(d["keep"] for d in evs[-1]["result"]["decisions"]) == [False, True]
    p = run("prune", "--dry-run", "--json-events", env=repo)
    assert events(p)[-1]["result"]["dry_run"] is True


def test_without_a_terminal_stderr_stays_quiet(tmp_path: Path, repo: dict[str, str]) -> None:
    img = tmp_path / "disk.raw"
    make_image(str(img), 5 << 20, seed=9)
    p = run("image", "backup", str(img), "--name", "vm1", env=repo)
    assert p.stderr == "" and p.stdout.startswith("snapshot vm1@")


def test_log_warnings_become_warning_events() -> None:
    sink = ListSink()
    log = logging.getLogger("vmdr.test-events")
    handler = _EventLogHandler(JobEvents(sink))
    log.addHandler(handler)
    try:
        log.warning("could not save cache: %s", "disk full")
        log.info("not an event")
    finally:
        log.removeHandler(handler)
    (w,) = sink.of(JobWarning)
    assert w.message == "could not save cache: disk full"


def test_start_args_leave_out_globals_and_passwords() -> None:
    import argparse

    from vmdr.cli.main import job_args, job_kind

    ns = argparse.Namespace(command="copy", func=print, repo="/srv/r", json=True,
                            to="sftp://bk:hunter2@vault/srv/r", names=["web*"], latest=None)
    assert job_kind(ns) == "copy"
    assert job_args(ns) == {"latest": None, "names": ["web*"],
                            "to": "sftp://bk:***@vault/srv/r"}
    assert job_kind(argparse.Namespace(command="repo", subcommand="init")) == "repo init"
