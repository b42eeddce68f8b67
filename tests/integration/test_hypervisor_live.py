"""vmdr.hypervisor against the real libvirtd: a TCG domain idling in SeaBIOS with a qcow2
disk and a raw disk of known content (no OS needed for backup jobs and NBD)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

pytestmark = pytest.mark.vm

libvirt = pytest.importorskip("libvirt")
libvirt_qemu = pytest.importorskip("libvirt_qemu")
pytest.importorskip("nbd")

from vmdr.errors import HeartbeatTimeout  # noqa: E402
from vmdr.hypervisor import DiskSource, Hypervisor, connect, rewrite_domain_xml  # noqa: E402
from vmdr.hypervisor.backup import BackupSession  # noqa: E402
from vmdr.hypervisor.cleanup import backup_job_active  # noqa: E402
from vmdr.hypervisor.overlay import OVERLAY_SUFFIX  # noqa: E402

MiB = 1 << 20
QCOW_SIZE = 64 * MiB
RAW_SIZE = 16 * MiB
PREFIX = "vmdr-17e57e57"
ROOT = Path("/var/tmp")


@dataclass
class VM:
    name: str
    dir: Path
    qcow: Path
    raw: Path
    scratch: str
    hv: Hypervisor
    expected: dict[str, bytearray]

    def dom(self) -> Any:
        """The raw virDomain (vmdr's driver keeps it private; the test pokes QEMU)."""
        conn = libvirt.open(self.hv.uri)
        return conn.lookupByName(self.name)

    def hmp(self, cmd: str) -> str:
        return str(libvirt_qemu.qemuMonitorCommand(
            self.dom(), cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))

    def qmp(self, execute: str, **arguments: Any) -> Any:
        cmd = json.dumps({"execute": execute, "arguments": arguments})
        return json.loads(libvirt_qemu.qemuMonitorCommand(self.dom(), cmd, 0))

    def guest_write(self, target: str, pattern: int, offset: int, length: int) -> None:
        """Write through the running QEMU (the VM owns the image)."""
        alias = _alias(self.dom().XMLDesc(0), target)
        out = self.hmp(f'qemu-io -d /machine/peripheral/{alias}/virtio-backend '
                       f'"write -P 0x{pattern:02x} {offset} {length}"')
        assert "error" not in out.lower(), out
        self.expected[target][offset:offset + length] = bytes([pattern]) * length

    def sources(self, flags: int = 0) -> dict[str, str]:
        root = ET.fromstring(self.dom().XMLDesc(flags))
        out: dict[str, str] = {}
        for d in root.findall("./devices/disk"):
            src = d.find("source")
            out[d.find("target").get("dev")] = src.get("file") if src is not None else None  # type: ignore
        return out


def _alias(xml: str, target: str) -> str:
    for d in ET.fromstring(xml).findall("./devices/disk"):
        if d.find("target").get("dev") == target:  # type: ignore[union-attr]
            return d.find("alias").get("name")  # type: ignore[union-attr,return-value]
    raise KeyError(target)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _domain_xml(name: str, qcow: Path, raw: Path) -> str:
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>{name}</name>
          <memory unit='MiB'>64</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
              <source file='{qcow}'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='disk'><driver name='qemu' type='raw'/>
              <source file='{raw}'/><target dev='vdb' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
              <target dev='sda' bus='sata'/><readonly/></disk>
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
            <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>
          </devices>
        </domain>""")


def _make_vm(hv: Hypervisor, tag: str, start: bool) -> VM:
    name = f"vmdr-it-{tag}-{uuid.uuid4().hex[:6]}"
    d = ROOT / name
    d.mkdir()
    qcow, raw = d / "vda.qcow2", d / "vdb.raw"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(QCOW_SIZE))
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 8M 512k",
         str(qcow))
    with open(raw, "wb") as f:
        f.truncate(RAW_SIZE)
        f.seek(2 * MiB)
        f.write(b"\x33" * (3 * MiB))
    exp_q = bytearray(QCOW_SIZE)
    exp_q[0:MiB] = b"\x11" * MiB
    exp_q[8 * MiB:8 * MiB + 512 * 1024] = b"\x22" * (512 * 1024)
    exp_r = bytearray(RAW_SIZE)
    exp_r[2 * MiB:5 * MiB] = b"\x33" * (3 * MiB)
    shutil.chown(d, "libvirt-qemu", "libvirt-qemu")
    for p in (qcow, raw):
        shutil.chown(p, "libvirt-qemu", "libvirt-qemu")
    hv.define(_domain_xml(name, qcow, raw))
    if start:
        hv.start(name)
    return VM(name, d, qcow, raw, str(d / "scratch"), hv, {"vda": exp_q, "vdb": exp_r})


def _destroy(vm: VM) -> None:
    try:
        dom = vm.dom()
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                          | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    finally:
        shutil.rmtree(vm.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def hv() -> Iterator[Hypervisor]:
    if os.geteuid() != 0:
        pytest.skip("needs root for qemu:///system")
    try:
        conn = connect("qemu:///system")
    except Exception as exc:  # pragma: no cover - environment
        pytest.skip(f"libvirtd not reachable: {exc}")
    yield conn
    conn.close()


@pytest.fixture
def vm(hv: Hypervisor) -> Iterator[VM]:
    """A running domain; afterwards it must still run on its original images."""
    machine = _make_vm(hv, "run", start=True)
    try:
        yield machine
        assert machine.dom().isActive()
        assert machine.sources() == {"vda": str(machine.qcow), "vdb": str(machine.raw),
                                     "sda": None}
        assert machine.sources(libvirt.VIR_DOMAIN_XML_INACTIVE)["vda"] == str(machine.qcow)
        assert not backup_job_active(machine.dom())
        assert not any(p.name.endswith(OVERLAY_SUFFIX) for p in machine.dir.rglob("*"))
    finally:
        _destroy(machine)


def _image(d: DiskSource, base: bytearray | None = None, threads: int = 1) -> bytearray:
    """Reassemble a disk from a session: data extents read (in 256 KiB pieces over
    ``threads`` threads), the rest zero (full) or unchanged from ``base`` (incremental)."""
    out = bytearray(d.size) if base is None else bytearray(base)
    covered = 0
    pieces = []
    for off, length, is_data in d.extents():
        assert off == covered, "extents must be contiguous"
        covered += length
        if is_data:
            pieces += [(o, min(256 * 1024, off + length - o))
                       for o in range(off, off + length, 256 * 1024)]
        elif base is None:
            out[off:off + length] = bytes(length)
    assert covered == d.size

    def fetch(piece: tuple[int, int]) -> None:
        out[piece[0]:piece[0] + piece[1]] = d.read(*piece)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fetch, pieces))
    return out


def _dirty(d: DiskSource) -> list[tuple[int, int]]:
    return [(o, n) for o, n, data in d.extents() if data]


def test_full_then_incremental(vm: VM) -> None:
    info = vm.hv.domain(vm.name)
    assert [d.skip_reason for d in info.disks] == [None, None, "cdrom"]
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        assert s.method == "checkpoint" and s.consistency == "crash"
        assert s.checkpoint is not None and s.checkpoint_xml and "<domain" in s.checkpoint_xml
        assert [d.target for d in s.skipped] == ["sda"]
        full = {d.info.target: _image(d, threads=3) for d in s.disks}
        assert not any(d.incremental for d in s.disks)
        s.commit()
        first = s.checkpoint
    assert full["vda"] == vm.expected["vda"]
    assert full["vdb"] == vm.expected["vdb"]
    assert vm.hv.list_checkpoints(info, PREFIX) == [first]

    vm.guest_write("vda", 0x55, 1 * MiB, 64 * 1024)
    vm.guest_write("vda", 0x66, 40 * MiB, 128 * 1024)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch,
                      incremental_from=first) as s:
        disks = {d.info.target: d for d in s.disks}
        assert disks["vda"].incremental and not disks["vdb"].incremental
        assert _dirty(disks["vda"]) == [(1 * MiB, 64 * 1024), (40 * MiB, 128 * 1024)]
        assert _image(disks["vda"], full["vda"]) == vm.expected["vda"]
        assert _image(disks["vdb"]) == vm.expected["vdb"]
        s.commit()
        second = s.checkpoint
    assert second != first
    assert vm.hv.list_checkpoints(info, PREFIX) == [second]  # only the latest is kept


def test_uncommitted_backup_leaves_nothing(vm: VM) -> None:
    info = vm.hv.domain(vm.name)
    with pytest.raises(RuntimeError), vm.hv.backup(
            info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch, quiesce=True) as s:
        assert s.consistency == "crash"  # no guest agent in SeaBIOS
        assert any("guest agent" in w for w in s.warnings)
        raise RuntimeError("storage failed")
    assert vm.hv.list_checkpoints(info, PREFIX) == []
    assert not Path(cast(BackupSession, s).workdir).exists()


def test_lost_checkpoint_or_bitmap_means_full(vm: VM) -> None:
    info = vm.hv.domain(vm.name)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        s.commit()
        cp, cp_xml = s.checkpoint, s.checkpoint_xml
    assert cp is not None and cp_xml is not None

    # metadata lost, bitmaps kept: redefine and the incremental works again
    vm.dom().checkpointLookupByName(cp).delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch,
                      incremental_from=cp) as s:
        assert not any(d.incremental for d in s.disks)
        assert "missing in libvirt" in (s.disks[0].full_reason or "")
    assert vm.hv.redefine_checkpoint(info, cp_xml) == cp
    vm.guest_write("vda", 0x77, 4 * MiB, 64 * 1024)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch,
                      incremental_from=cp) as s:
        assert s.disks[0].incremental
        assert _dirty(s.disks[0]) == [(4 * MiB, 64 * 1024)]

    # the bitmap itself vanished from QEMU: libvirt still lists the checkpoint
    node = next(n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)["return"]
                if n.get("dirty-bitmaps") and n["drv"] == "qcow2")
    vm.qmp("block-dirty-bitmap-remove", node=node, name=cp)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch,
                      incremental_from=cp) as s:
        assert not s.disks[0].incremental
        assert "missing or broken" in (s.disks[0].full_reason or "")
        assert _image(s.disks[0]) == vm.expected["vda"]
        s.commit()

    # checkpoint deleted outright
    vm.hv.delete_checkpoint(info, s.checkpoint or "")
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch,
                      incremental_from=s.checkpoint) as s2:
        assert not any(d.incremental for d in s2.disks)


def test_overlay_on_raw_disk(vm: VM) -> None:
    info = vm.hv.domain(vm.name)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch, disks=["vdb"],
                      method="overlay") as s:
        assert s.method == "overlay" and s.checkpoint is None
        assert vm.sources()["vdb"].endswith(OVERLAY_SUFFIX)
        vm.guest_write("vdb", 0x44, 0, 64 * 1024)  # lands in the overlay, not in our read
        d = s.disks[0]
        image = _image(d)
        s.commit()
    vm.expected["vdb"][0:64 * 1024] = bytes(64 * 1024)
    assert image == vm.expected["vdb"]
    with open(vm.raw, "rb") as f:  # the overlay was merged back into the raw file
        assert f.read(4) == b"\x44" * 4


def test_overlay_on_qcow2_disk_keeps_checkpoint_exact(vm: VM) -> None:
    """Writes made while an overlay was active still show as dirty in the next incremental."""
    info = vm.hv.domain(vm.name)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        s.commit()
        cp = s.checkpoint
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch, disks=["vda"],
                      method="overlay") as s:
        before = bytearray(vm.expected["vda"])
        vm.guest_write("vda", 0x42, 12 * MiB, 64 * 1024)  # goes to the overlay
        assert _image(s.disks[0]) == before
        s.commit()
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch,
                      incremental_from=cp) as s:
        vda = s.disks[0]
        assert vda.incremental
        assert (12 * MiB, 64 * 1024) in _dirty(vda)


def test_offline_read_of_stopped_domain(hv: Hypervisor) -> None:
    machine = _make_vm(hv, "off", start=False)
    try:
        info = hv.domain(machine.name)
        assert info.state == "stopped"
        with hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=machine.scratch) as s:
            assert s.method == "offline" and s.checkpoint is None
            images = {d.info.target: _image(d, threads=2) for d in s.disks}
            # the images are locked like QEMU locks them: the VM cannot start meanwhile
            with pytest.raises(libvirt.libvirtError, match="lock"):
                machine.dom().create()
            s.commit()
        assert images == machine.expected
        assert not machine.dom().isActive()
    finally:
        _destroy(machine)


KILLER = """
import os, signal, sys
from vmdr.hypervisor import connect
hv = connect("qemu:///system")
info = hv.domain(sys.argv[1])
s = hv.backup(info, checkpoint_prefix=sys.argv[2], scratch_dir=sys.argv[3], method=sys.argv[4])
s.start()
for d in s.disks:
    d.read(0, 4096)
print(s.checkpoint, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_backup(vm: VM, method: str) -> str:
    out = subprocess.run([sys.executable, "-c", KILLER, vm.name, PREFIX, vm.scratch, method],
                         capture_output=True, text=True, check=False)
    assert out.returncode == -9, out.stderr
    return out.stdout.strip()


def test_cleanup_after_kill_during_pull_backup(vm: VM) -> None:
    info = vm.hv.domain(vm.name)
    cp = _killed_backup(vm, "checkpoint")
    assert vm.dom().jobStats().get("operation") == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert vm.hv.list_checkpoints(info, PREFIX) == [cp]
    done = vm.hv.cleanup_leftovers(vm.name, PREFIX, vm.scratch)
    assert "aborted leftover backup job" in done
    assert f"deleted half-made checkpoint {cp}" in done
    assert vm.hv.list_checkpoints(info, PREFIX) == []
    assert vm.hv.cleanup_leftovers(vm.name, PREFIX, vm.scratch) == []
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        assert _image(s.disks[0]) == vm.expected["vda"]


def test_cleanup_after_kill_during_overlay(vm: VM) -> None:
    _killed_backup(vm, "overlay")
    assert vm.sources()["vda"].endswith(OVERLAY_SUFFIX)
    vm.guest_write("vda", 0x99, 2 * MiB, 64 * 1024)
    done = vm.hv.cleanup_leftovers(vm.name, PREFIX, vm.scratch)
    assert "merged leftover overlay of vda" in done and "merged leftover overlay of vdb" in done
    info = vm.hv.domain(vm.name)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        assert _image(s.disks[0]) == vm.expected["vda"]  # the write survived the merge


def test_cleanup_overlay_of_domain_stopped_meanwhile(vm: VM) -> None:
    _killed_backup(vm, "overlay")
    vm.guest_write("vda", 0x5a, 3 * MiB, 64 * 1024)
    vm.dom().destroy()
    assert vm.sources(libvirt.VIR_DOMAIN_XML_INACTIVE)["vda"].endswith(OVERLAY_SUFFIX)
    done = vm.hv.cleanup_leftovers(vm.name, PREFIX, vm.scratch)
    assert any("restored original image of vda" in x for x in done)
    vm.hv.start(vm.name)
    info = vm.hv.domain(vm.name)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        assert _image(s.disks[0]) == vm.expected["vda"]


def test_restore_copy_defines_and_starts(vm: VM) -> None:
    info = vm.hv.domain(vm.name)
    copy_qcow = vm.dir / "copy-vda.qcow2"
    copy_raw = vm.dir / "copy-vdb.raw"
    shutil.copy(vm.qcow, copy_qcow)
    shutil.copy(vm.raw, copy_raw)
    for p in (copy_qcow, copy_raw):
        shutil.chown(p, "libvirt-qemu", "libvirt-qemu")
    new = vm.name + "-copy"
    xml = rewrite_domain_xml(info.xml, new_name=new, disk_paths={
        "vda": (str(copy_qcow), "qcow2"), "vdb": (str(copy_raw), "raw")})
    assert vm.hv.define(xml) == new
    try:
        vm.hv.start(new)
        copy = vm.hv.domain(new)
        assert copy.running and copy.uuid != info.uuid
        assert copy.disk("vda").source == str(copy_qcow)
        with pytest.raises(HeartbeatTimeout):  # SeaBIOS has no guest agent
            vm.hv.wait_heartbeat(new, agent=True, timeout=1)
    finally:
        vm.hv.destroy(new)
        vm.hv.undefine(new)


def _bitmaps(vm: VM) -> set[str]:
    nodes = vm.qmp("query-named-block-nodes", flat=True)["return"]
    return {b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])}


def test_orphaned_bitmap_removed_by_full(vm: VM) -> None:
    """A checkpoint whose libvirt record was lost leaves its bitmap in the image; the next
    full backup removes it, and only bitmaps of its own prefix."""
    info = vm.hv.domain(vm.name)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        s.commit()
        lost = s.checkpoint
    assert lost is not None
    vm.dom().checkpointLookupByName(lost).delete(
        libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    nodes = vm.qmp("query-named-block-nodes", flat=True)["return"]
    node = next(n["node-name"] for n in nodes if n.get("drv") == "qcow2"
                and n.get("file") == str(vm.qcow))
    other = "vmdr-0ffff0ffff0f-20250101T000000.000Z"
    assert "error" not in vm.qmp("block-dirty-bitmap-add", node=node, name=other,
                                 persistent=True)
    assert {lost, other} <= _bitmaps(vm)
    with vm.hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=vm.scratch) as s:
        s.commit()
        new = s.checkpoint
    names = _bitmaps(vm)
    assert lost not in names and new in names and other in names
    assert cast(BackupSession, s).orphans_removed == [lost]
    vm.qmp("block-dirty-bitmap-remove", node=node, name=other)
