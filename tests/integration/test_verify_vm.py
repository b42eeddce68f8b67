"""``vmdr verify --boot`` and ``vmdr serve`` on a real backed-up guest (libvirtd + QEMU).

One guest is booted and backed up once per module; each test boots at most one sandbox.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.estate import TestVM, cleanup_stale

from .vmtools import VMDR, backup, nbdkit_pids, repo_env, vmdr

pytestmark = pytest.mark.vm
SCRATCH = "/var/lib/libvirt/qemu/vmdr"
VERIFY_ROOT = Path(SCRATCH) / "verify"
PASS = "vm test passphrase"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A guest backed up once (the guest itself is gone before the tests run)."""
    cleanup_stale()
    tmp = tmp_path_factory.mktemp("verify")
    env = repo_env(tmp)
    with TestVM(writer_rate=0) as vm:
        vm.wait_heartbeat(120)
        vm.agent_ping(60)
        res = backup(env, vm.name)["results"][0]
        assert res["status"] == "ok"
        name = vm.name
    yield {"env": env, "name": name, "snapshot": res["snapshot"], "tmp": tmp}


def _open_repo(path: str) -> Any:
    from vmdr.repository.repo import Repository
    from vmdr.storage.registry import open_backend

    return Repository.open(open_backend(path), passphrase=lambda: PASS, use_cache=False)


def _copy_repo(guest: dict[str, Any], tag: str) -> dict[str, str]:
    dst = guest["tmp"] / f"repo-{tag}"
    shutil.copytree(guest["env"]["VMDR_REPO"], dst)
    return dict(guest["env"], VMDR_REPO=str(dst))


def _domains() -> list[str]:
    p = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True)
    return [n for n in p.stdout.split() if n]




def _assert_no_leftovers(domain: str) -> None:
    assert domain not in _domains()
    assert not nbdkit_pids(str(VERIFY_ROOT / domain))
    assert not (VERIFY_ROOT / domain).exists()


def test_boot_verify_passes_and_records_screenshot(guest: dict[str, Any]) -> None:
    env, name = guest["env"], guest["name"]
    ev_dir = guest["tmp"] / "evidence"
    p = vmdr(env, "verify", name, "--boot", "--timeout", "150", "--json",
             "--evidence-dir", str(ev_dir))
    res = json.loads(p.stdout)
    assert res["status"] == "passed", res
    checks = {c["name"]: c for c in res["checks"]}
    assert checks["agent"]["status"] == "passed" and checks["start"]["status"] == "passed"
    assert res["heartbeat_s"] and 0 < res["heartbeat_s"] < 150
    assert res["domain"].startswith("vmdr-verify-")
    ev = res["evidence"][0]
    png = Path(ev["path"]).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and ev["width"] >= 320 and ev["height"] >= 200
    with _open_repo(env["VMDR_REPO"]) as repo:
        stored = [a for a in repo.attachments(guest["snapshot"], "evidence")]
        assert base64.b64decode(stored[-1]["data"]) == png
        rec = repo.attachments(guest["snapshot"], "verification")[-1]
        assert rec["status"] == "passed" and rec["boot"] is True
        assert rec["evidence"][0]["attachment"] == ev["attachment"]
    snaps = json.loads(vmdr(env, "snapshots", "--json").stdout)
    assert snaps[-1]["verification"]["status"] == "passed"
    _assert_no_leftovers(res["domain"])


def test_corrupt_boot_disk_fails_with_check_named(guest: dict[str, Any]) -> None:
    """A copy of the repository gets a snapshot whose vda chunk 0 (MBR, bootloader) is a
    hole: the sandbox boots to 'No bootable device' and the agent check fails."""
    from vmdr.repository.crypto import HOLE

    env = _copy_repo(guest, "corrupt")
    with _open_repo(env["VMDR_REPO"]) as repo:
        snap = repo.load_snapshot(guest["snapshot"])
        vda = next(d for d in snap.disks if d.name == "vda")
        vda.chunks[0] = HOLE
        bad = repo.save_snapshot(snap)
    p = vmdr(env, "verify", f"{guest['name']}@{bad[:12]}", "--boot", "--timeout", "25",
             "--json", code=16)
    res = json.loads(p.stdout)
    assert res["status"] == "failed"
    failed = [c["name"] for c in res["checks"] if c["status"] == "failed"]
    assert failed == ["agent"], res["checks"]
    assert "(agent)" in p.stderr and p.stderr.count("vmdr: error") == 1
    assert res["evidence"] and res["evidence"][0]["attachment"]
    with _open_repo(env["VMDR_REPO"]) as repo:
        assert repo.attachments(bad, "verification")[-1]["status"] == "failed"
    _assert_no_leftovers(res["domain"])


def test_missing_chunk_fails_data_verification(guest: dict[str, Any]) -> None:
    env = _copy_repo(guest, "missing")
    with _open_repo(env["VMDR_REPO"]) as repo:
        snap = repo.load_snapshot(guest["snapshot"])
        from vmdr.repository.crypto import HOLE
        from vmdr.repository.repo import chunk_name

        vdb = next(d for d in snap.disks if d.name == "vdb")
        oid = next(c for c in vdb.chunks if c != HOLE)
    os.unlink(os.path.join(env["VMDR_REPO"], chunk_name(oid)))
    p = vmdr(env, "verify", guest["name"], "--json", code=16)
    res = json.loads(p.stdout)
    data = res["checks"][0]
    assert data["name"] == "data" and data["status"] == "failed"
    assert f"{guest['name']}@{guest['snapshot'][:8]}:vdb" in data["detail"]
    assert "missing" in data["detail"]


def test_kill9_mid_verify_is_cleaned_by_next_run(guest: dict[str, Any]) -> None:
    env, name = guest["env"], guest["name"]
    proc = subprocess.Popen([*VMDR, "verify", name, "--boot", "--timeout", "120",
                             "--no-record"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    domain = ""
    try:
        deadline = time.monotonic() + 90
        while not domain and time.monotonic() < deadline:
            domain = next((d for d in _domains() if d.startswith("vmdr-verify-")
                           and name in d), "")
            time.sleep(0.2)
        assert domain, "the sandbox domain never appeared"
        sandbox = VERIFY_ROOT / domain
        assert nbdkit_pids(str(sandbox))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (domain in _domains() or nbdkit_pids(str(sandbox))):
        time.sleep(0.2)
    assert domain not in _domains(), "autodestroy did not remove the domain"
    assert not nbdkit_pids(str(sandbox)), "nbdkit outlived vmdr"
    assert (sandbox / "state.json").exists()  # files are left for the next run
    p = vmdr(env, "-v", "verify", name, "--no-record")  # any next run, even without --boot
    assert f"cleaned up: removed {sandbox}" in p.stderr
    _assert_no_leftovers(domain)


def test_served_vm_disks_equal_restored_images(guest: dict[str, Any]) -> None:
    env, name = guest["env"], guest["name"]
    target = guest["tmp"] / "restored"
    res = json.loads(vmdr(env, "restore", name, "--target-dir", str(target), "--format", "raw",
                          "--json").stdout)
    sock_dir = guest["tmp"] / "sockets"
    proc = subprocess.Popen([*VMDR, "serve", name, "--socket-dir", str(sock_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((sock_dir / f"{d}.sock").exists() for d in ("vda", "vdb")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.3)
        for disk in ("vda", "vdb"):
            uri = f"nbd+unix:///{disk}?socket={sock_dir / (disk + '.sock')}"
            p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                res["disks"][disk], uri], capture_output=True, text=True,
                               timeout=120)
            assert p.returncode == 0, p.stdout + p.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not any(sock_dir.glob("*.sock"))
