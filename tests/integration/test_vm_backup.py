"""Live VM backup and restore against real libvirtd + QEMU guests (tests/guest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.guest.estate import TestVM
from tests.guest.records import check_records

from .vmtools import VMDR, backup, checkpoints, domain_disk_sources, repo_env, vmdr

pytestmark = pytest.mark.vm
SCRATCH = "/var/lib/libvirt/qemu/vmdr"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return repo_env(tmp_path)


def _restore_dir(vm: TestVM, tag: str) -> str:
    d = vm.images.vms_dir / f"{vm.name}-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _undefine(vm: TestVM, name: str) -> None:
    for cmd in (["virsh", "-q", "destroy", name], ["virsh", "-q", "undefine", name]):
        subprocess.run(cmd, capture_output=True, check=False)


def test_full_incremental_restore_boots(live_vm: TestVM, env: dict[str, str]) -> None:
    """Test 1: full, incremental under write load, restore under a new name, boot,
    consistent data prefix; every snapshot is a synthetic full."""
    full = backup(env, live_vm.name)["results"][0]
    assert full["status"] == "ok" and full["mode"] == "full"
    assert full["consistency"] == "quiesced" and full["method"] == "checkpoint"
    seq_before = live_vm.writer_seq() or 0
    time.sleep(3)  # the writer keeps writing records
    assert (live_vm.writer_seq() or 0) > seq_before
    inc = backup(env, live_vm.name)["results"][0]
    assert inc["status"] == "ok" and inc["mode"] == "incremental"
    assert inc["bytes_read"] < full["bytes_read"]
    assert checkpoints(live_vm.dom) == [c for c in checkpoints(live_vm.dom)
                                        if c.startswith("vmdr-")]
    assert len(checkpoints(live_vm.dom)) == 1  # only the latest per repository
    snaps = json.loads(vmdr(env, "snapshots", "--json").stdout)
    assert [s["id"] for s in snaps] == [full["snapshot"], inc["snapshot"]]

    new = f"{live_vm.name}-r"
    target = _restore_dir(live_vm, "restore")
    try:
        p = vmdr(env, "restore", live_vm.name, "--name", new, "--target-dir", target,
                 "--define", "--start", "--timeout", "180", "--json")
        res = json.loads(p.stdout)
        assert res["started"] and res["heartbeat_s"] > 0
        import libvirt

        conn = libvirt.open("qemu:///system")
        dom = conn.lookupByName(new)
        assert dom.UUIDString() != live_vm.dom.UUIDString()
        assert set(domain_disk_sources(dom).values()) == set(res["disks"].values())
        assert "<mac address" not in live_vm.dom.XMLDesc(0) or \
            _macs(dom.XMLDesc(0)).isdisjoint(_macs(live_vm.dom.XMLDesc(0)))
        dom.destroy()
        rc = check_records(res["disks"]["vdb"], "qcow2")
        assert rc.consistent, rc.problems
        assert rc.count > 0
        conn.close()
    finally:
        _undefine(live_vm, new)
    assert live_vm.is_active()
    assert domain_disk_sources(live_vm.dom)["vda"] == str(live_vm.boot_disk)


def _macs(xml: str) -> set[str]:
    import re

    return set(re.findall(r"<mac address=['\"]([0-9a-f:]+)['\"]", xml))


def test_restored_image_matches_backup_point(env: dict[str, str], tmp_path: Path) -> None:
    """Test 2: byte-exact: with the guest paused at the backup point, the restored
    images equal the live images."""
    with TestVM(writer_rate=0) as vm:
        vm.wait_heartbeat(120)
        vm.dom.suspend()
        try:
            r = backup(env, vm.name, "--consistency", "crash")["results"][0]
            assert r["status"] == "ok"
            target = str(tmp_path / "restore")
            res = json.loads(vmdr(env, "restore", vm.name, "--target-dir", target,
                                  "--format", "raw", "--json").stdout)
            for disk, src in (("vda", vm.boot_disk), ("vdb", vm.data_disk)):
                p = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                                    str(src), res["disks"][disk]], capture_output=True,
                                   text=True)
                assert p.returncode == 0, p.stdout + p.stderr
        finally:
            vm.dom.resume()


def test_quiesce_and_crash_fallback(env: dict[str, str]) -> None:
    """Test 3: without a guest agent, auto falls back to crash; quiesce refuses."""
    with TestVM(agent=False, writer_rate=0) as vm:
        vm.wait_heartbeat(120)
        r = backup(env, vm.name)["results"][0]
        assert r["status"] == "ok" and r["consistency"] == "crash"
        assert any("agent" in w for w in r["warnings"])
        out = backup(env, vm.name, "--consistency", "quiesce", code=10)["results"][0]
        assert out["status"] == "failed" and "agent" in out["error"]
        assert vm.is_active()


def test_overlay_fallback_on_raw_disk(env: dict[str, str]) -> None:
    """Test 4: delta mode on raw disks: overlay, read the base, blockcommit + pivot."""
    with TestVM(raw=True, writer_rate=20) as vm:
        vm.wait_heartbeat(120)
        before = domain_disk_sources(vm.dom)
        r = backup(env, vm.name, "--method", "overlay")["results"][0]
        assert r["status"] == "ok" and r["method"] == "overlay"
        assert domain_disk_sources(vm.dom) == before  # pivoted back onto the raw files
        assert vm.is_active()
        n = len(vm.heartbeats())
        vm.wait_heartbeat(30, count=n + 2)  # still alive and ticking
        assert not list(Path(SCRATCH).rglob("*.overlay*"))
        # the raw disk restores to a consistent prefix of records
        d = vm.images.vms_dir / f"{vm.name}-raw"
        res = json.loads(vmdr(env, "restore", vm.name, "--target-dir", str(d), "--format",
                              "raw", "--json").stdout)
        assert check_records(res["disks"]["vdb"], "raw").consistent


def test_stopped_vm(env: dict[str, str], tmp_path: Path) -> None:
    """Test 5: a stopped VM is read offline; a repeat costs nothing new."""
    with TestVM(start=False) as vm:
        r1 = backup(env, vm.name)["results"][0]
        assert r1["status"] == "ok" and r1["method"] == "offline" and r1["mode"] == "full"
        r2 = backup(env, vm.name)["results"][0]
        assert r2["bytes_stored"] == 0
        res = json.loads(vmdr(env, "restore", vm.name, "--target-dir", str(tmp_path / "o"),
                              "--json").stdout)
        p = subprocess.run(["qemu-img", "compare", str(vm.boot_disk), res["disks"]["vda"]],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_deleted_checkpoint_forces_full(live_vm: TestVM, env: dict[str, str]) -> None:
    """Test 6: a deleted checkpoint → the next backup reads everything."""
    backup(env, live_vm.name)
    for cp in live_vm.dom.listAllCheckpoints(0):
        if cp.getName().startswith("vmdr-"):
            cp.delete(0x2)  # VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY keeps nothing useful
    r = backup(env, live_vm.name)["results"][0]
    assert r["status"] == "ok"
    assert r["mode"] in ("full", "incremental")
    if r["mode"] == "incremental":
        # metadata was redefined from the snapshot and the bitmaps were still valid
        assert any("redefined" in w for w in r["warnings"])
    for cp in live_vm.dom.listAllCheckpoints(0):
        if cp.getName().startswith("vmdr-"):
            cp.delete(0)  # bitmaps gone too
    r = backup(env, live_vm.name)["results"][0]
    assert r["status"] == "ok" and r["mode"] == "full"


def test_kill_9_mid_backup(live_vm: TestVM, env: dict[str, str], tmp_path: Path) -> None:
    """Test 7: kill -9 of vmdr mid-backup; the VM runs on its own images; the next
    backup cleans up and succeeds."""
    before = domain_disk_sources(live_vm.dom)
    # a post-thaw hook that sleeps holds vmdr inside the running backup job
    hook = tmp_path / "slow.sh"
    hook.write_text("#!/bin/sh\nsleep 30\n")
    hook.chmod(0o755)
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f'[hooks]\npost-thaw = "{hook}"\ntimeout = 60\n')
    env_slow = dict(env, VMDR_CONFIG=str(cfg))
    proc = subprocess.Popen([*VMDR, "backup", live_vm.name, "--mode", "full"], env=env_slow,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _job_active(live_vm):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert live_vm.is_active()
    assert domain_disk_sources(live_vm.dom) == before
    r = backup(env, live_vm.name)["results"][0]
    assert r["status"] == "ok", r
    assert any("interrupted" in w for w in r["warnings"]), r["warnings"]
    assert not _job_active(live_vm)
    assert domain_disk_sources(live_vm.dom) == before


def _job_active(vm: TestVM) -> bool:
    try:
        return bool(vm.dom.jobInfo()[0] != 0)
    except Exception:
        return False


def test_restore_to_second_connection(live_vm: TestVM, env: dict[str, str],
                                      sshd_server: object, tmp_path: Path) -> None:
    """Test 8: restore defines and boots the VM through another libvirt connection
    (qemu+ssh through a real sshd on loopback)."""
    backup(env, live_vm.name)
    srv = sshd_server
    uri = (f"qemu+ssh://root@127.0.0.1:{srv.port}/system?keyfile={srv.client_key}"  # type: ignore[attr-defined]
           "&no_verify=1&no_tty=1")  # loopback test sshd with a throwaway host key
    new = f"{live_vm.name}-ssh"
    try:
        res = json.loads(vmdr(env, "restore", live_vm.name, "--name", new, "--target-dir",
                              _restore_dir(live_vm, "ssh"), "--define", "--start",
                              "--connect", uri, "--timeout", "180", "--json").stdout)
        assert res["defined"] and res["heartbeat_s"] > 0
    finally:
        _undefine(live_vm, new)


def test_bad_input(live_vm: TestVM, env: dict[str, str], tmp_path: Path) -> None:
    """Test 9: each bad input gives one clear line and its exit code."""
    r = backup(env, "no-such-vm", code=11)["results"][0]
    assert "no-such-vm" in r["error"]
    no_repo = dict(env, VMDR_REPO=str(tmp_path / "missing"))
    p = vmdr(no_repo, "backup", live_vm.name, code=3)
    assert "no vmdr repository" in p.stderr
    down = dict(env, VMDR_CONNECT="qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    p = vmdr(down, "backup", live_vm.name, code=12)
    assert p.stderr.count("\n") == 1
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\necho 'database refused to flush' >&2\nexit 3\n")
    hook.chmod(0o755)
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f'[hooks]\npre-backup = "{hook}"\n')
    r = backup(dict(env, VMDR_CONFIG=str(cfg)), live_vm.name, code=15)["results"][0]
    assert "database refused to flush" in r["error"]
    assert live_vm.is_active()
    # a VM without disks
    import libvirt

    conn = libvirt.open("qemu:///system")
    xml = ("<domain type='qemu'><name>vmdr-test-nodisk</name><memory unit='MiB'>64</memory>"
           "<os><type>hvm</type></os></domain>")
    conn.defineXML(xml)
    try:
        r = backup(env, "vmdr-test-nodisk", code=2)["results"][0]
        assert "no disks" in r["error"]
    finally:
        conn.lookupByName("vmdr-test-nodisk").undefine()
        conn.close()


def test_restore_into_full_target(live_vm: TestVM, env: dict[str, str],
                                  tmp_path: Path) -> None:
    """Test 9 (cont.): a target dir without space: exit 9, nothing half-written."""
    backup(env, live_vm.name)
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        p = vmdr(env, "restore", live_vm.name, "--target-dir", str(mnt), "--format", "raw",
                 code=9)
        assert "space" in p.stderr
        assert not [f for f in os.listdir(mnt) if f.endswith(".img")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
