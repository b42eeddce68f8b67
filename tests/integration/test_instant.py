"""Instant recovery and file-level restore against the real test guest (two boots in all).

The source VM is backed up offline (never booted); instant-restore boots its copy from the
repository and moves the disks home; a second run loses its NBD server mid-migration.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.estate import TestVM, cleanup_stale
from tests.guest.records import check_records
from vmdr.errors import MigrationStopped

from .vmtools import VMDR, backup, domain_disk_sources, nbdkit_pids, repo_env, vmdr

pytestmark = pytest.mark.vm
BEAT = re.compile(r"VMDR-HEARTBEAT (\d+)")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestVM, dict[str, str]]]:
    cleanup_stale()
    env = repo_env(tmp_path_factory.mktemp("instant"))
    with TestVM(start=False) as vm:
        r = backup(env, vm.name)["results"][0]
        assert r["status"] == "ok" and r["method"] == "offline"
        yield vm, env


def _conn() -> Any:
    import libvirt

    return libvirt.open("qemu:///system")


def _discard(name: str) -> None:
    for cmd in (["virsh", "-q", "destroy", name], ["virsh", "-q", "undefine", name]):
        subprocess.run(cmd, capture_output=True, check=False)


def _beats(log: Path) -> int:
    try:
        found = BEAT.findall(log.read_text(errors="replace"))
    except FileNotFoundError:
        return 0
    return int(found[-1]) if found else 0


def _wait_beats(log: Path, more_than: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = _beats(log)
        if n > more_than:
            return n
        time.sleep(0.5)
    raise AssertionError(f"no heartbeat after {more_than} in {log}")


def _events(stderr: str) -> list[dict[str, Any]]:
    """The --json-events stream: every line of stderr is one event."""
    return [json.loads(ln) for ln in stderr.splitlines()]


def _label(event: dict[str, Any]) -> str:
    """A phase event by its phase name, any other event by its type."""
    return str(event["phase"] if event["type"] == "phase" else event["type"])


def test_files_from_guest_data_disk(source: tuple[TestVM, dict[str, str]],
                                    tmp_path: Path) -> None:
    """A known file of the guest's data disk (MBR, ext4 partition 1) comes back intact."""
    vm, env = source
    known = {f["path"]: f["sha256"] for f in vm.images.files}
    for rel in ("hello.txt", "random/nested/deeper/large.bin"):
        dest = tmp_path / os.path.basename(rel)
        vmdr(env, "files", "get", vm.name, "--disk", "vdb", rel, str(dest))
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == known[rel]
    p = vmdr(env, "files", "ls", vm.name, "--disk", "vdb", "--partition", "2", "/", code=2)
    assert p.stderr.count("\n") == 1 and "no filesystem" in p.stderr


def test_instant_restore_then_repository_gone(source: tuple[TestVM, dict[str, str]]) -> None:
    vm, env = source
    new = f"{vm.name}-i"
    target = vm.images.vms_dir / f"{vm.name}-instant"
    repo = Path(env["VMDR_REPO"])
    away = repo.with_name("repo.away")
    try:
        p = vmdr(env, "instant-restore", vm.name, "--name", new, "--target-dir", str(target),
                 "--json", "--json-events")
        res = json.loads(p.stdout)
        events = _events(p.stderr)
        kinds = [_label(e) for e in events]
        assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["result"] == res
        assert "migrate" in kinds and kinds.count("pivot") == 2 and "progress" in kinds
        assert res["heartbeat_s"] > 0
        conn = _conn()
        dom = conn.lookupByName(new)
        assert dom.isActive() and dom.UUIDString() != vm.dom.UUIDString()
        for xml in (dom.XMLDesc(0), dom.XMLDesc(2)):  # live and persistent (INACTIVE)
            assert "protocol='nbd'" not in xml and "overlay" not in xml
        # the next boot uses the final names; the running QEMU keeps the hidden names it
        # copied to, which are hard links to the same files
        assert all(path in dom.XMLDesc(2) for path in res["disks"].values())
        assert sorted(res["hidden"]) == sorted(domain_disk_sources(dom).values())
        for disk, path in res["disks"].items():
            assert os.path.samefile(path, domain_disk_sources(dom)[disk])
        # the VM's own error policy again from its next boot on; 'stop' until then
        assert "error_policy" not in dom.XMLDesc(2)
        assert "error_policy='stop'" in dom.XMLDesc(0)
        assert not list(target.glob("*.overlay.qcow2"))
        state = json.loads((target / f"{new}.instant.json").read_text())
        assert state["moved"]  # kept for the hidden names, until the VM's next start
        assert not os.path.exists(f"/run/vmdr/instant/{new}")
        repo.rename(away)  # the repository is gone: the VM must not care
        log = target / f"{new}-console.log"
        n = _beats(log)
        _wait_beats(log, n + 2)
        assert dom.state()[0] == 1  # VIR_DOMAIN_RUNNING
        conn.close()
    finally:
        if away.exists():
            away.rename(repo)
        _discard(new)
        shutil.rmtree(target, ignore_errors=True)




def _private_dirs_of(pid: int) -> list[str]:
    """The NBD servers' private directories (/run/vmdr/vmdr-serve-*) the vmdr ``pid`` made."""
    out = []
    for d in Path("/run/vmdr").glob("vmdr-serve-*"):
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if owner.get("pid") == pid:
            out.append(str(d))
    return out


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*VMDR, "instant-restore", *args, "--json-events"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _until_copying(proc: subprocess.Popen[str]) -> list[str]:
    """Read JSON events until a disk copy reports progress; the events seen."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(_label(json.loads(line)))
        if seen[-1] == "progress":
            return seen
    rest = proc.stderr.read()
    raise AssertionError(f"no copy started (exit {proc.wait()}): {seen} {rest}")


def _stopped(proc: subprocess.Popen[str], code: int) -> str:
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert proc.wait(120) == code, rest
    assert "Traceback" not in rest and "--resume" in rest
    return rest


def test_interrupt_and_server_lost_mid_migration(
        source: tuple[TestVM, dict[str, str]]) -> None:
    """Ctrl-C, then the NBD server dying, then vmdr killed (-9) while disks are copied:
    each time the VM is left paused (never corrupt) or running, no final disk name exists
    before its copy is complete, and --resume finishes the move."""
    vm, env = source
    new = f"{vm.name}-m"
    target = vm.images.vms_dir / f"{vm.name}-mid"
    slow = ["--bandwidth", "0.25"]
    procs: list[subprocess.Popen[str]] = []
    conn = _conn()
    try:
        procs.append(_start(env, vm.name, "--name", new, "--target-dir", str(target), *slow))
        assert "migrate" in _until_copying(procs[-1])  # after the heartbeat
        procs[-1].send_signal(signal.SIGINT)  # Ctrl-C
        _stopped(procs[-1], 130)
        dom = conn.lookupByName(new)
        assert dom.state()[0] == 3  # VIR_DOMAIN_PAUSED
        assert (target / f"{new}.instant.json").exists()

        procs.append(_start(env, "--resume", new, "--target-dir", str(target), *slow))
        assert "migrate" in _until_copying(procs[-1])  # resumed
        for pid in nbdkit_pids(f"/run/vmdr/instant/{new}"):
            os.kill(pid, signal.SIGKILL)  # the repository's NBD export is gone
        _stopped(procs[-1], MigrationStopped.exit_code)  # 17
        assert dom.state()[0] == 3

        # kill -9 mid-copy (issue 14 item 5): the copies only ever had hidden names
        procs.append(_start(env, "--resume", new, "--target-dir", str(target), *slow))
        assert "migrate" in _until_copying(procs[-1])
        finals = [target / f"{new}-{d}.qcow2" for d in ("vda", "vdb")]
        hidden = list(target.glob(f".{new}-*.qcow2.*.vmdr-instant"))
        assert len(hidden) == 2 and not any(f.exists() for f in finals)
        procs[-1].kill()
        procs[-1].wait(30)
        killed = procs[-1].pid
        assert not any(f.exists() for f in finals)
        log = target / f"{new}-console.log"
        n = _beats(log)
        # one --resume finishes: the killed run's nbdkit (which would answer ESHUTDOWN) is
        # gone and QEMU's NBD clients have reconnected before anything reads; no copy fails
        p = subprocess.run([*VMDR, "instant-restore", "--resume", new, "--target-dir",
                            str(target), "--json"], capture_output=True, text=True, env=env,
                           timeout=600)
        assert p.returncode == 0, p.stderr
        assert "failed" not in p.stderr, p.stderr  # no copy restarted
        assert not nbdkit_pids(f"/run/vmdr/instant/{new}")
        assert _private_dirs_of(killed) == []  # the killed run's pid files and logs too
        res = json.loads(p.stdout)
        _wait_beats(log, n)
        assert dom.state()[0] == 1  # VIR_DOMAIN_RUNNING
        assert all(f.exists() for f in finals)
        assert sorted(res["disks"].values()) == sorted(map(str, finals))
        for xml in (dom.XMLDesc(0), dom.XMLDesc(2)):
            assert "protocol='nbd'" not in xml
        dom.destroy()
        rc = check_records(res["disks"]["vdb"], "qcow2")
        assert rc.consistent, rc.problems
        # off now, so the hidden names are unused: --resume removes them and the state file
        res = json.loads(vmdr(env, "instant-restore", "--resume", new, "--target-dir",
                              str(target), "--json").stdout)
        assert res["hidden"] == [] and not list(target.glob(".*.vmdr-instant"))
        assert not (target / f"{new}.instant.json").exists()
        assert all(f.exists() for f in finals)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        conn.close()
        _discard(new)
        shutil.rmtree(target, ignore_errors=True)
