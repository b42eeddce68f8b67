"""Replicas against real libvirtd + QEMU guests: the DR "site" is the local libvirtd with its
own directory (the two-site test over ssh in network namespaces needs tests/multihost).

One guest writes sequence-numbered records throughout; the replica is seeded, kept current
by incrementals that move only what changed, rotated to N points, coexists with backups
(both checkpoint chains stay intact), is fed from a repository too, and boots."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.estate import HEARTBEAT_RE, TestVM, cleanup_stale, ensure_isolated_network
from tests.guest.records import check_records

from .vmtools import backup, checkpoints, repo_env, vmdr

pytestmark = pytest.mark.vm
URI = "qemu:///system"


def _undefine(name: str) -> None:
    for cmd in (["virsh", "-q", "destroy", name],
                ["virsh", "-q", "undefine", name, "--snapshots-metadata"]):
        subprocess.run(cmd, capture_output=True, check=False)


@pytest.fixture(scope="module")
def guest() -> Iterator[TestVM]:
    cleanup_stale()
    net = ensure_isolated_network()
    with TestVM(writer_rate=40, network=net) as vm:
        vm.wait_heartbeat(120)
        vm.agent_ping(60)
        yield vm


@pytest.fixture
def dr(guest: TestVM) -> Iterator[Path]:
    d = guest.images.vms_dir / f"{guest.name}-dr"
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        for name in (f"{guest.name}-replica", f"{guest.name}-rrepo", f"{guest.name}-copy"):
            _undefine(name)
        subprocess.run(["umount", "-l", str(d / "tiny")], capture_output=True, check=False)
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _replicate(env: dict[str, str], *args: str, code: int = 0) -> dict[str, Any]:
    p = vmdr(env, "replicate", "--json", *args, code=code)
    res: dict[str, Any] = json.loads(p.stdout)["results"][0]
    return res


def _snapshot_tags(path: str) -> list[str]:
    out = subprocess.run(["qemu-img", "snapshot", "-l", "-U", path], capture_output=True,
                         text=True, check=True).stdout
    return [ln.split()[1] for ln in out.splitlines()[2:] if ln.split()]


def test_replica_cycles_points_backup_coexistence_and_boot(
        guest: TestVM, dr: Path, tmp_path: Path) -> None:
    env = repo_env(tmp_path)
    vm = guest.name
    standby = f"{vm}-replica"
    common = ("--to", URI, "--dir", str(dr), "--points", "2", "--rpo", "1h")

    seed = _replicate(env, vm, *common)
    assert seed["mode"] == "seed" and seed["defined"] and seed["bytes_moved"] > 0
    assert seed["consistency"] == "quiesced"
    import libvirt

    conn = libvirt.open(URI)
    try:
        sdom = conn.lookupByName(standby)
        assert not sdom.isActive()
        assert sdom.UUIDString() != guest.dom.UUIDString()
        assert "vmdr-test-isolated" in sdom.XMLDesc(0)
        state = json.loads((dr / vm / "replica.json").read_text())
        assert state["standby_uuid"] == sdom.UUIDString()
    finally:
        conn.close()

    # a backup between cycles: its own checkpoint chain next to the replica's
    b1 = backup(env, vm)["results"][0]
    assert b1["status"] == "ok"
    seq = guest.writer_seq() or 0
    time.sleep(3)
    assert (guest.writer_seq() or 0) > seq
    inc = _replicate(env, vm, *common)
    assert inc["mode"] == "incremental"
    assert 0 < inc["bytes_moved"] < seed["bytes_moved"] / 4
    assert inc["bytes_moved"] < inc["disk_bytes"] / 20  # only changed ranges moved
    cps = checkpoints(guest.dom)
    replica_cps = [c for c in cps if c.startswith("vmdr-replica-")]
    backup_cps = [c for c in cps if not c.startswith("vmdr-replica-")]
    assert len(replica_cps) == 1 and len(backup_cps) == 1, cps
    b2 = backup(env, vm)["results"][0]
    assert b2["status"] == "ok" and b2["mode"] == "incremental"  # backup chain undisturbed

    # with the guest paused, the standby equals the source at the checkpoint
    guest.dom.suspend()
    try:
        third = _replicate(env, vm, *common)
        assert third["mode"] == "incremental" and third["rotated"] == [seed["point"]]
        for disk, src in (("vda", guest.boot_disk), ("vdb", guest.data_disk)):
            path = str(dr / vm / f"{standby}-{disk}.qcow2")
            p = subprocess.run(["qemu-img", "compare", "-U", path, str(src)],
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stdout + p.stderr
            assert _snapshot_tags(path) == [inc["point"], third["point"]]
    finally:
        guest.dom.resume()
    rc = check_records(str(dr / vm / f"{standby}-vdb.qcow2"), "qcow2", force_share=True)
    assert rc.consistent and rc.count > 0, rc.problems

    st = json.loads(vmdr(env, "replicate", "status", "--to", URI, "--dir", str(dr),
                         "--json").stdout)["replicas"]
    assert [r["vm"] for r in st] == [vm]
    assert st[0]["sla"] == "meeting-sla" and st[0]["newest_point"] == third["point"]
    assert st[0]["bytes_moved_per_cycle"][:3] == [seed["bytes_moved"], inc["bytes_moved"],
                                                  third["bytes_moved"]]

    # repository feed: seed from the newest backup, then only the chunks that changed
    rdir = ("--to", URI, "--dir", str(dr / "from-repo"), "--feed", "repository",
            "--standby-name", f"{vm}-rrepo")
    r1 = _replicate(env, vm, *rdir)
    assert r1["mode"] == "seed" and r1["bytes_moved"] > 0
    time.sleep(2)
    backup(env, vm)
    r2 = _replicate(env, vm, *rdir)
    assert r2["mode"] == "incremental"
    assert 0 < r2["bytes_moved"] < r1["bytes_moved"] / 4
    assert r2["bytes_moved"] % (4 << 20) == 0 or r2["bytes_moved"] < r2["disk_bytes"]
    rc = check_records(str(dr / "from-repo" / vm / f"{vm}-rrepo-vdb.qcow2"), "qcow2")
    assert rc.consistent and rc.count > 0, rc.problems
    again = _replicate(env, vm, *rdir)
    assert again["bytes_moved"] == 0 and again["mode"] == "none"
    # seeded from the repository, continued by the direct feed: the first direct cycle
    # hashes the VM's chunks here and sends only those the standby lacks
    ddir = ("--to", URI, "--dir", str(dr / "from-repo"), "--standby-name", f"{vm}-rrepo")
    d1 = _replicate(env, vm, *ddir)
    assert d1["feed"] == "direct" and d1["mode"] == "full"
    assert 0 < d1["bytes_moved"] < r1["bytes_moved"] / 4, (d1, r1)
    d2 = _replicate(env, vm, *ddir)
    assert d2["mode"] == "incremental"

    _boot_copy(standby, f"{vm}-copy", dr / "copy")
    assert guest.is_active()


def _boot_copy(standby: str, name: str, d: Path) -> None:
    """Start the standby as a copy (overlays on its disks, a new name) and see it boot."""
    from vmdr.hypervisor import rewrite_domain_xml
    from vmdr.hypervisor.console import relocate_console_logs

    d.mkdir()
    os.chmod(d, 0o755)
    import libvirt

    conn = libvirt.open(URI)
    try:
        xml = conn.lookupByName(standby).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        import xml.etree.ElementTree as ET

        disks = {}
        for el in ET.fromstring(xml).findall("./devices/disk"):
            src, tgt = el.find("source"), el.find("target")
            if src is None or tgt is None or el.get("device") != "disk":
                continue
            dev = tgt.get("dev", "")
            ov = str(d / f"{dev}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            src.get("file", ""), ov], check=True)
            disks[dev] = (ov, "qcow2")
        assert set(disks) == {"vda", "vdb"}, xml
        xml = relocate_console_logs(rewrite_domain_xml(xml, new_name=name, disk_paths=disks),
                                    str(d), name)
        dom = conn.createXML(xml, 0)
        log = d / f"{name}-console.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and HEARTBEAT_RE.search(log.read_text(errors="replace"))):
            assert time.monotonic() < deadline, "the standby copy did not boot"
            assert dom.isActive()
            time.sleep(0.5)
        dom.destroy()
    finally:
        conn.close()


def test_replica_bad_input(guest: TestVM, dr: Path, tmp_path: Path) -> None:
    env = repo_env(tmp_path)
    vm = guest.name
    before = checkpoints(guest.dom)
    base = ("--to", URI, "--dir", str(dr))
    p = vmdr(env, "replicate", "no-such-vm-xyz", *base, code=11)
    assert p.stderr.startswith("vmdr: error:") and len(p.stderr.splitlines()) == 1
    p = vmdr(env, "replicate", vm, "--to", "qemu+ssh://root@127.0.0.1:1/system", code=12)
    assert len(p.stderr.splitlines()) == 1
    p = vmdr(env, "replicate", vm, *base, "--network-map", "vmdr-test-isolated=no-such-net",
             code=10)
    assert "no-such-net" in p.stderr and len(p.stderr.splitlines()) == 1
    from vmdr.jobs.vmlock import VMLock

    os.environ["VMDR_LOCK_DIR"] = env["VMDR_LOCK_DIR"]
    try:
        with VMLock(URI, vm):
            p = vmdr(env, "replicate", vm, *base, code=13)
    finally:
        del os.environ["VMDR_LOCK_DIR"]
    assert len(p.stderr.splitlines()) == 1
    tiny = dr / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tiny)],
                      capture_output=True).returncode == 0:
        p = vmdr(env, "replicate", vm, "--to", URI, "--dir", str(tiny), code=9)
        assert "space" in p.stderr and len(p.stderr.splitlines()) == 1
        subprocess.run(["umount", str(tiny)], check=False)
    assert checkpoints(guest.dom) == before  # the source untouched
    assert guest.is_active()


def _guest_dd(name: str, path: str, mib: int) -> None:
    """The guest writes ``mib`` MiB of random bytes to a new file and syncs it."""
    from vmdr.hypervisor import connect

    hv = connect(URI)
    try:
        r = hv.lookup(name).guest_exec(["/bin/dd", "if=/dev/urandom", f"of={path}", "bs=1M",
                                        f"count={mib}", "conv=fsync"], timeout=120)
        assert r.exitcode == 0, r.stderr
    finally:
        hv.close()


def test_a_cycle_after_a_1pct_change_moves_only_the_changed_bytes(
        guest: TestVM, dr: Path, tmp_path: Path) -> None:
    """Bytes moved ≈ bytes changed: the guest writes 3 MiB (about 1 % of its 320 MiB of
    disks); the cycle moves those, plus what the record writer (40 × 4 KiB/s) and ext4's
    metadata and journal added meanwhile, and nothing else."""
    env = repo_env(tmp_path)
    vm = guest.name
    common = ("--to", URI, "--dir", str(dr), "--points", "2")
    _replicate(env, vm, *common)  # seed
    t0 = time.monotonic()
    _replicate(env, vm, *common)  # the last cycle before the change
    mib = 3
    _guest_dd(vm, "/data/vmdr-1pct.bin", mib)
    r = _replicate(env, vm, *common)
    took = time.monotonic() - t0
    changed = mib << 20
    slack = int(took * 40 * 4096) + (2 << 20)  # the writer's records, ext4 metadata
    assert r["mode"] == "incremental"
    assert changed <= r["bytes_moved"] <= changed + slack, (r["bytes_moved"], changed, slack)
    assert r["disk_bytes"] > 50 * changed  # 1 % or less of the disks


def test_a_stopped_vm_is_synced_from_its_last_checkpoint(
        guest: TestVM, dr: Path, tmp_path: Path) -> None:
    """A planned failover's final cycle: after a clean shutdown only what changed since
    the last cycle is read (the checkpoint's bitmaps, saved in the qcow2 images), and the
    standby then equals the source."""
    env = repo_env(tmp_path)
    vm = guest.name
    standby = f"{vm}-replica"
    common = ("--to", URI, "--dir", str(dr), "--points", "3")
    _replicate(env, vm, *common)
    _replicate(env, vm, *common)
    guest.stop(graceful=True, timeout=90)
    try:
        final = _replicate(env, vm, *common, "--consistency", "crash")
        assert final["mode"] == "incremental", final
        assert final["bytes_moved"] < final["disk_bytes"] / 20
        for disk, src in (("vda", guest.boot_disk), ("vdb", guest.data_disk)):
            path = str(dr / vm / f"{standby}-{disk}.qcow2")
            p = subprocess.run(["qemu-img", "compare", "-U", path, str(src)],
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stdout + p.stderr
        again = _replicate(env, vm, *common, "--consistency", "crash")
        # still stopped: the same checkpoint again, so the same changes once more
        assert again["mode"] == "incremental" and again["bytes_moved"] == final["bytes_moved"]
    finally:
        guest.start()
    rc = check_records(str(dr / vm / f"{standby}-vdb.qcow2"), "qcow2", force_share=True)
    assert rc.consistent and rc.count > 0, rc.problems
