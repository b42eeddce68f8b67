"""Live backup of VMs on a ``qemu+ssh://`` host (a real sshd on loopback).

The hypervisor is this machine, but vmdr runs in a private mount namespace in which the
scratch directory (and, for the stopped VM, its image directory) is an empty tmpfs: any
local path vmdr assumed would be missing or vanish, so every byte it reads has to come
through ssh (state file ``cat``, unix-socket forwarding of the NBD export).
"""

from __future__ import annotations

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

from tests.guest.estate import TestVM
from tests.guest.records import check_records
from tests.integration.servers import SSHServer

from .vmtools import VMDR, checkpoints, domain_disk_sources, leftover_files, repo_env

pytestmark = pytest.mark.vm

_HIDE = r"""IFS=:
for d in $VMDR_TEST_HIDE; do mount -t tmpfs -o size=1m,mode=0700 vmdr-hidden "$d" || exit 99; done
unset IFS
exec "$@"
"""


@pytest.fixture
def scratch() -> Iterator[str]:
    """A scratch directory of its own (QEMU must reach it: under /var/lib/libvirt/qemu)."""
    path = f"/var/lib/libvirt/qemu/vmdr-rt{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(tmp_path: Path, scratch: str, sshd_server: SSHServer) -> dict[str, str]:
    e = repo_env(tmp_path)
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f'scratch_dir = "{scratch}"\n')
    srv = sshd_server
    # libvirt's ssh transport ignores known_hosts (no_verify for it); vmdr's own ssh uses it
    uri = (f"qemu+ssh://root@127.0.0.1:{srv.port}/system?keyfile={srv.client_key}"
           f"&known_hosts={srv.known_hosts}&no_verify=1&no_tty=1")
    e.update(VMDR_CONFIG=str(cfg), VMDR_CONNECT=uri, VMDR_TEST_HIDE=scratch)
    return e


def _argv(*args: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _HIDE,
            "hide", *VMDR, *args]


def rvmdr(env: dict[str, str], *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(_argv(*args), capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == code, f"exit {p.returncode} != {code}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def rbackup(env: dict[str, str], *args: str, code: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(rvmdr(env, "backup", "--json", *args, code=code).stdout)
    return out["results"][0]  # type: ignore[no-any-return]


def restore(env: dict[str, str], vm: str, target: Path) -> dict[str, Any]:
    env = {k: v for k, v in env.items() if k != "VMDR_CONNECT"}
    p = subprocess.run([*VMDR, "restore", vm, "--target-dir", str(target), "--format", "raw",
                        "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def _ssh_leftovers() -> list[int]:
    """Local ssh processes of a vmdr session (their control path is in vmdr-ssh-*)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith((b"ssh\0", b"/usr/bin/ssh\0")) and b"/vmdr-ssh-" in cmd:
                pids.append(int(d))
    return pids


def _job_active(vm: TestVM) -> bool:
    try:
        return bool(vm.dom.jobInfo()[0] != 0)
    except Exception:
        return False


def test_remote_full_incremental_restore(live_vm: TestVM, env: dict[str, str], scratch: str,
                                         tmp_path: Path) -> None:
    """Full then incremental through qemu+ssh under write load; the restored data disk is
    a consistent prefix of the guest's records; nothing is left on either side."""
    before = set(_ssh_leftovers())
    full = rbackup(env, live_vm.name)
    assert full["status"] == "ok", full
    assert full["mode"] == "full" and full["method"] == "checkpoint"
    assert full["consistency"] == "quiesced"
    time.sleep(3)
    inc = rbackup(env, live_vm.name)
    assert inc["status"] == "ok" and inc["mode"] == "incremental", inc
    assert inc["bytes_read"] < full["bytes_read"]
    assert len([c for c in checkpoints(live_vm.dom) if c.startswith("vmdr-")]) == 1
    assert not _job_active(live_vm)
    left = [f for f in leftover_files(scratch) if not f.endswith(".lease")]
    assert left == [], left  # lease files stay (see vmdr.hypervisor.hostfiles)
    assert not set(_ssh_leftovers()) - before
    res = restore(env, live_vm.name, tmp_path / "r")
    rc = check_records(res["disks"]["vdb"], "raw")
    assert rc.consistent, rc.problems
    assert rc.count > 0


def test_remote_paused_is_byte_exact(env: dict[str, str], tmp_path: Path) -> None:
    """With the guest paused, the remote backup restores to exactly the live images."""
    with TestVM(writer_rate=0) as vm:
        vm.wait_heartbeat(120)
        vm.dom.suspend()
        try:
            r = rbackup(env, vm.name, "--consistency", "crash")
            assert r["status"] == "ok" and r["method"] == "checkpoint", r
            res = restore(env, vm.name, tmp_path / "r")
            for disk, src in (("vda", vm.boot_disk), ("vdb", vm.data_disk)):
                p = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                                    str(src), res["disks"][disk]], capture_output=True, text=True)
                assert p.returncode == 0, p.stdout + p.stderr
        finally:
            vm.dom.resume()


def test_remote_stopped_vm(env: dict[str, str], tmp_path: Path) -> None:
    """A stopped remote VM is read by a read-only qemu-nbd on the host, over ssh; its
    images are hidden from vmdr's own namespace."""
    with TestVM(start=False) as vm:
        before = set(_ssh_leftovers())
        e = dict(env, VMDR_TEST_HIDE=f"{env['VMDR_TEST_HIDE']}:{vm.dir}")
        r = rbackup(e, vm.name)
        assert r["status"] == "ok" and r["method"] == "offline", r
        res = restore(env, vm.name, tmp_path / "o")
        p = subprocess.run(["qemu-img", "compare", "-F", "raw", str(vm.boot_disk),
                            res["disks"]["vda"]], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        assert not set(_ssh_leftovers()) - before
        out = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{vm.dir}"], capture_output=True)
        assert out.returncode == 1, "a remote qemu-nbd outlived the backup"


def test_remote_kill_9_then_cleanup(live_vm: TestVM, env: dict[str, str], scratch: str,
                                    tmp_path: Path) -> None:
    """kill -9 of vmdr inside a remote backup: its ssh forwarding dies with it, the job
    stays on the host; the next run aborts the job, removes the state and succeeds."""
    before = domain_disk_sources(live_vm.dom)
    hook = tmp_path / "slow.sh"
    hook.write_text("#!/bin/sh\nsleep 30\n")
    hook.chmod(0o755)
    cfg = Path(env["VMDR_CONFIG"])
    slow_cfg = tmp_path / "slow.toml"
    slow_cfg.write_text(cfg.read_text() + f'[hooks]\npost-thaw = "{hook}"\ntimeout = 60\n')
    proc = subprocess.Popen(_argv("backup", live_vm.name, "--mode", "full"),
                            env=dict(env, VMDR_CONFIG=str(slow_cfg)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not _job_active(live_vm):
        time.sleep(0.1)
    assert _job_active(live_vm), "the backup job never started"
    time.sleep(0.5)
    states = [Path(r, f) for r, _, fs in os.walk(scratch) for f in fs if f == "state.json"]
    assert len(states) == 1
    st = json.loads(states[0].read_text())
    assert st["remote"] and st["ssh_pids"] and st["local_dir"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 10  # the ssh master gets SIGTERM (pdeathsig)
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists()
                                              for p in st["ssh_pids"]):
        time.sleep(0.1)
    assert not [p for p in st["ssh_pids"] if Path(f"/proc/{p}").exists()]
    assert _job_active(live_vm)  # the remote job is still there: nobody aborted it
    assert live_vm.is_active()
    r = rbackup(env, live_vm.name)
    assert r["status"] == "ok", r
    assert any("aborted leftover backup job" in w for w in r["warnings"]), r["warnings"]
    assert not _job_active(live_vm)
    assert not states[0].exists()
    assert not Path(st["local_dir"]).exists()
    assert domain_disk_sources(live_vm.dom) == before
    assert st["checkpoint"] not in checkpoints(live_vm.dom)  # the half-made one is gone
