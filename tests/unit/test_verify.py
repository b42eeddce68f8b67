"""``vmdr verify`` without booting: data checks, results, options, the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from vmdr.config import VMConfig
from vmdr.errors import ConfigError, UsageError
from vmdr.hypervisor import Domain
from vmdr.jobs.image import backup_image
from vmdr.jobs.verify import (
    VerifyOptions,
    options_for,
    select_snapshots,
    verify_snapshot,
)
from vmdr.repository.crypto import HOLE
from vmdr.repository.repo import chunk_name
from vmdr.serve.checks import Check, run_script

from .repofixtures import SMALL_CHUNK, make_image, make_repo

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def test_options_merge_vm_config() -> None:
    vm = VMConfig(heartbeat="login:", extra={
        "verify_agent": False, "verify_ports": [22, 80], "verify_script": "/bin/true",
        "verify_network": "iso", "verify_timeout": 42})
    o = options_for(VerifyOptions(boot=True, ports=[443]), vm)
    assert o.agent is False and o.console == "login:" and o.ports == [443, 22, 80]
    assert o.scripts == ["/bin/true"] and o.network == "iso" and o.timeout == 42.0
    o2 = options_for(VerifyOptions(console="READY", agent=True, timeout=10), vm)
    assert o2.console == "READY" and o2.agent is True and o2.timeout == 10
    assert options_for(VerifyOptions(), VMConfig(heartbeat="agent")).console is None
    for bad in ({"verify_ports": ["22"]}, {"verify_agent": "yes"},
                {"verify_console": "("}, {"verify_script": [1]}):
        with pytest.raises(ConfigError):
            options_for(VerifyOptions(), VMConfig(extra=bad))


def test_run_script_env_and_result(tmp_path: Path) -> None:
    script = tmp_path / "t.sh"
    script.write_text('#!/bin/sh\necho "domain=$VMDR_VERIFY_DOMAIN snap=$VMDR_SNAPSHOT"\n'
                      'test -n "$VMDR_VERIFY_CONSOLE"\n')
    script.chmod(0o755)
    c = run_script(str(script), {"VMDR_VERIFY_DOMAIN": "d", "VMDR_SNAPSHOT": "s",
                                 "VMDR_VERIFY_CONSOLE": "/c"}, 10, 0.0)
    assert c.status == "passed" and c.detail == "domain=d snap=s" and c.name == "script:t.sh"
    c = run_script(str(script), {"VMDR_VERIFY_DOMAIN": "d", "VMDR_SNAPSHOT": "s"}, 10, 0.0)
    assert c.status == "failed" and c.detail.startswith("exit 1")
    assert run_script(str(tmp_path / "missing"), {}, 10, 0.0).status == "failed"


def test_verify_records_pass_and_missing_chunk_names_snapshot(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    make_image(str(tmp_path / "disk"), 12 * SMALL_CHUNK, seed=5)
    snap = backup_image(repo, str(tmp_path / "disk"), "web", [], None, 2).snapshot
    res = verify_snapshot(repo, snap, VerifyOptions())
    assert res.status == "passed" and [c.name for c in res.checks] == ["data"]
    rec = repo.attachments(snap.id, "verification")[-1]
    assert rec["status"] == "passed" and rec["boot"] is False and rec["checks"][0]["seconds"] >= 0
    oid = next(c for c in snap.disks[0].chunks if c != HOLE)
    os.unlink(os.path.join(str(tmp_path / "repo"), chunk_name(oid)))
    res = verify_snapshot(repo, snap, VerifyOptions())
    assert res.status == "failed" and res.failed_checks() == ["data"]
    assert f"web@{snap.short_id}:disk" in res.checks[0].detail
    assert repo.attachments(snap.id, "verification")[-1]["status"] == "failed"
    res = verify_snapshot(repo, snap, VerifyOptions(record=False))
    assert res.attachment is None and len(repo.attachments(snap.id, "verification")) == 2
    with pytest.raises(UsageError, match="not a VM snapshot"):
        verify_snapshot(repo, snap, VerifyOptions(boot=True, record=False))


def test_select_snapshots(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    make_image(str(tmp_path / "d"), 4 * SMALL_CHUNK, seed=1)
    a1 = backup_image(repo, str(tmp_path / "d"), "a", [], None, 1).snapshot
    make_image(str(tmp_path / "d"), 4 * SMALL_CHUNK, seed=2)
    a2 = backup_image(repo, str(tmp_path / "d"), "a", [], None, 1).snapshot
    b = backup_image(repo, str(tmp_path / "d"), "b", [], None, 1).snapshot
    assert {s.id for s in select_snapshots(repo, [], True, False, False)} == {a1.id, a2.id, b.id}
    assert {s.id for s in select_snapshots(repo, [], True, True, False)} == {a2.id, b.id}
    assert select_snapshots(repo, [], True, False, True) == []  # no VM snapshots to boot
    assert [s.id for s in select_snapshots(repo, ["a"], False, False, False)] == [a2.id]
    with pytest.raises(UsageError):
        select_snapshots(repo, [], False, False, False)
    with pytest.raises(UsageError):
        select_snapshots(repo, ["a"], True, False, False)


def _run(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*VMDR, *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert p.returncode == code, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    return p


def test_cli_verify_exit_codes_and_json(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("pass phrase\n")
    pw.chmod(0o600)
    env = {"VMDR_REPO": str(tmp_path / "repo"), "VMDR_PASSWORD_FILE": str(pw)}
    _run(env, "repo", "init")
    make_image(str(tmp_path / "img"), 8 * SMALL_CHUNK, seed=9)
    _run(env, "image", "backup", str(tmp_path / "img"), "--name", "db")
    out = json.loads(_run(env, "verify", "db", "--json").stdout)
    assert out["status"] == "passed" and out["checks"][0]["name"] == "data"
    assert set(out) >= {"status", "checks", "heartbeat_s", "evidence", "attachment"}
    snaps = json.loads(_run(env, "snapshots", "--json").stdout)
    assert snaps[-1]["verification"]["status"] == "passed"
    data = tmp_path / "repo" / "data"
    victim = next(p for p in data.rglob("*") if p.is_file())
    victim.unlink()
    p = _run(env, "verify", "--all", "--json", code=16)
    doc = json.loads(p.stdout)
    assert doc["status"] == "failed" and doc["failed"] == 1
    assert "db@" in doc["results"][0]["checks"][0]["detail"]
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("vmdr: error")]
    assert len(errs) == 1 and "db@" in errs[0] and "(data)" in errs[0]
    p = _run(env, "verify", code=2)
    assert "--all" in p.stderr


@pytest.mark.parametrize("cmd", ["serve", "verify"])
def test_help(cmd: str) -> None:
    p = _run({}, cmd, "--help")
    assert "usage: vmdr " + cmd in p.stdout


def test_check_as_dict_rounds() -> None:
    assert Check("agent", "passed", 1.23456).as_dict() == {
        "name": "agent", "status": "passed", "seconds": 1.235, "detail": ""}


class _Dom:
    def __init__(self, active: bool = True, addresses: list[str] | None = None) -> None:
        self.active = active
        self.addresses = addresses or []

    def is_active(self) -> bool:
        return self.active

    def guest_addresses(self) -> list[str]:
        return self.addresses



def _dom(active: bool = True, addresses: list[str] | None = None) -> Domain:
    """A _Dom where the code under test takes a Domain (it calls only what _Dom has)."""
    return cast(Domain, _Dom(active, addresses))

def test_heartbeats_console_pass_fatal_and_timeout(tmp_path: Path) -> None:
    from vmdr.serve.checks import wait_heartbeats

    log = tmp_path / "console.log"
    log.write_text("SeaBIOS\nVMDR-HEARTBEAT 1 2.5\n")
    beats = wait_heartbeats(_dom(), t0=0.0, deadline=1e12, agent_ping=False,
                            console_pattern=r"HEARTBEAT \d+", console_log=str(log), poll=0)
    assert [(c.name, c.status) for c in beats] == [("console", "passed")]
    log.write_text("Booting from Hard Disk...\nNo bootable device.\n")
    beats = wait_heartbeats(_dom(), t0=0.0, deadline=1e12, agent_ping=False,
                            console_pattern="login:", console_log=str(log), poll=0)
    assert beats[0].status == "failed" and "No bootable device" in beats[0].detail
    beats = wait_heartbeats(_dom(), t0=0.0, deadline=0.0, agent_ping=False,
                            console_pattern="login:", console_log=str(log), poll=0,
                            fatal_pattern=None)
    assert beats[0].status == "failed" and "no answer within" in beats[0].detail
    beats = wait_heartbeats(_dom(active=False), t0=0.0, deadline=1e12, agent_ping=False,
                            console_pattern="login:", console_log=str(tmp_path / "none"),
                            poll=0)
    assert "stopped" in beats[0].detail and "console is empty" in beats[0].detail


def test_port_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from vmdr.serve import checks

    assert [c.status for c in checks.check_ports(_dom(), [22], t0=0, deadline=1e12,
                                                 has_network=False)] == ["skipped"]
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    guest = _dom(addresses=["127.0.0.1"])
    try:
        ok = checks.check_ports(guest, [port], t0=0, deadline=1e12, has_network=True)
    finally:
        srv.close()
    assert ok[0].status == "passed" and ok[0].detail == f"127.0.0.1:{port}"
    bad = checks.check_ports(guest, [port], t0=0, deadline=0, has_network=True)
    assert bad[0].status == "failed"
