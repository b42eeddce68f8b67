"""A test failover's frozen view of a restore point against a replica cycle writing the
same standby disk at the same time (real qemu-img, qemu-nbd and libnbd; no VM).

What the test copy reads is served by :func:`vmdr.jobs.failover_site.freeze` (qemu-nbd,
read-only, ``force-share``, the internal snapshot loaded with ``-l``). Meanwhile the
cycle's own writer (:meth:`Site.writer`, qemu-nbd read-write, as ``replicate_direct``)
rewrites every cluster and zeroes a range, takes new points and deletes old ones, as the
rotation does. Every byte the reader serves must stay the pinned point's; the rotation
must see the pin while the reader runs and not after; and, as the counter-proof, deleting
the point under a reader does change what it serves (that is why the pin exists).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest

from vmdr.jobs import failover_site as fs
from vmdr.jobs.replicate_site import Site
from vmdr.jobs.replicate_state import ReplicaState, RestorePoint

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-nbd") and shutil.which("qemu-img") and shutil.which("flock")),
    reason="needs qemu-utils and util-linux")

MIB = 1 << 20
SIZE = 16 * MIB


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _fill(path: Path, pattern: int, length: int = SIZE) -> None:
    _sh("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 0 {length}", str(path))


def _digest(sock: str) -> str:
    import nbd

    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        size = h.get_size()
        out = hashlib.sha256()
        for off in range(0, size, 4 * MIB):
            out.update(h.pread(min(4 * MIB, size - off), off))
        return out.hexdigest()
    finally:
        h.shutdown()


class _HV:
    """The DR host's connection as :func:`fs.freeze` asks it: who QEMU runs as."""

    def __init__(self, qemu: tuple[int, int] | None) -> None:
        self.qemu = qemu

    def qemu_identity(self) -> tuple[int, int] | None:
        return self.qemu


class _VM:
    """The parts of a DR-site VM that :func:`fs.freeze` uses."""

    def __init__(self, site: Site, disk: Path, qemu: tuple[int, int] | None = None) -> None:
        self.name = "vm1"
        self.site = site
        self.hv = _HV(qemu)
        self.state = ReplicaState(vm="vm1", source_uri="x", source_uuid="u", standby="s",
                                  standby_uuid="su", target_uri="qemu:///system",
                                  directory=str(disk.parent), prefix="p",
                                  disks={"vda": {"path": str(disk), "size": SIZE}})
        self.pv = cast(Any, type("PV", (), {"directory": str(disk.parent)}))
        self.readers: list[subprocess.Popen[bytes]] = []
        self.exports: dict[str, str] = {}
        self.point: str | None = None


def test_cycle_writes_new_points_and_rotation_do_not_touch_the_frozen_point(
        tmp_path: Path) -> None:
    d = tmp_path / "replica"
    d.mkdir()
    disk = d / "s-vda.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    _fill(disk, 0x11)
    _sh("qemu-img", "snapshot", "-c", "rp-1", str(disk))
    _fill(disk, 0x22, 8 * MIB)
    _sh("qemu-img", "snapshot", "-c", "rp-2", str(disk))  # the point under test
    with Site("qemu:///system") as site:
        vm = _VM(site, disk)
        run_dir = fs.freeze(cast(fs.DRVM, vm), "r1", RestorePoint("rp-2", "t", "direct", "seed"))
        sock = vm.exports["vda"]
        before = _digest(sock)
        # the overlay the test copy starts on is backed by the export, not the disk
        info = subprocess.run(["qemu-img", "info", "-U", f"{run_dir}/vda.qcow2"],
                              check=True, capture_output=True, text=True).stdout
        assert f"nbd+unix:///?socket={sock}" in info
        assert site.pinned_points(str(d)) == {"rp-2"}
        # a replica cycle: the same writer as replicate_direct, then points and rotation
        for n in range(3):
            w = site.writer(str(disk))
            for off in range(0, SIZE, 4 * MIB):
                w.write(off, bytes([0x30 + n]) * (4 * MIB))
            w.zero(4 * MIB, 2 * MIB)
            w.close()
            site.add_snapshot(str(disk), f"rp-new{n}")
            keep = site.pinned_points(str(d))
            site.delete_snapshots(str(disk), [t for t in site.snapshots(str(disk))
                                              if t not in keep and t != f"rp-new{n}"])
        assert site.snapshots(str(disk)) == ["rp-2", "rp-new2"]
        assert _digest(sock) == before  # not one byte of the frozen point changed
        _sh("qemu-img", "check", "-U", str(disk))
        # the pin and a leftover sweep: a live test directory stays
        assert site.run(fs._LEFTOVERS, str(d)).stdout == b""
        assert Path(run_dir).is_dir()
        for p in vm.readers:
            site.stop(p)
        assert site.pinned_points(str(d)) == set()  # the pin goes with the reader
        assert site.run(fs._LEFTOVERS, str(d)).stdout.decode().strip() == run_dir


def test_without_the_pin_deleting_the_point_changes_what_the_reader_serves(
        tmp_path: Path) -> None:
    """The counter-proof: the point under a reader must not be deleted."""
    d = tmp_path / "replica"
    d.mkdir()
    disk = d / "s-vda.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    _fill(disk, 0x11)
    _sh("qemu-img", "snapshot", "-c", "rp-1", str(disk))
    with Site("qemu:///system") as site:
        vm = _VM(site, disk)
        fs.freeze(cast(fs.DRVM, vm), "r1", RestorePoint("rp-1", "t", "direct", "seed"))
        before = _digest(vm.exports["vda"])
        w = site.writer(str(disk))
        for off in range(0, SIZE, 4 * MIB):
            w.write(off, b"\x55" * (4 * MIB))
        w.close()
        site.delete_snapshots(str(disk), ["rp-1"])  # what an unpinned rotation would do
        w = site.writer(str(disk))  # the freed clusters are reused by the next writes
        for off in range(0, SIZE, 4 * MIB):
            w.write(off, b"\x66" * (4 * MIB))
        w.close()
        assert _digest(vm.exports["vda"]) != before
        for p in vm.readers:
            site.stop(p)


def test_a_point_that_cannot_be_served_is_one_line_and_holds_no_pin(tmp_path: Path) -> None:
    from vmdr.errors import HypervisorError

    d = tmp_path / "replica"
    d.mkdir()
    disk = d / "s-vda.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    with Site("qemu:///system") as site:
        vm = _VM(site, disk)
        with pytest.raises(HypervisorError) as e:
            fs.freeze(cast(fs.DRVM, vm), "r1", RestorePoint("rp-gone", "t", "direct", "seed"))
        assert "cannot serve restore point rp-gone of disk vda" in e.value.message
        assert "\n" not in e.value.message
        for p in vm.readers:
            site.stop(p)
        assert site.pinned_points(str(d)) == set()


def _qemu_group() -> tuple[int, int]:
    """A QEMU user other than us: libvirt-qemu's ids where it exists, else nobody's."""
    import pwd

    for name in ("libvirt-qemu", "qemu", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
    pytest.skip("no account other than ours to run QEMU as")


@pytest.mark.parametrize("who", ["other", "us", "unknown"])
def test_the_export_socket_reaches_only_qemu(tmp_path: Path, who: str) -> None:
    """0660 with QEMU's group when QEMU runs as another user (the system libvirtd's
    libvirt-qemu), 0600 when it runs as us (root QEMU with vmdr as root, a session), never
    open to every local user."""
    qemu = {"other": _qemu_group(), "us": (os.geteuid(), os.getegid()),
            "unknown": None}[who]
    d = tmp_path / "replica"
    d.mkdir()
    disk = d / "s-vda.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    _sh("qemu-img", "snapshot", "-c", "rp-1", str(disk))
    with Site("qemu:///system") as site:
        vm = _VM(site, disk, qemu)
        try:
            fs.freeze(cast(fs.DRVM, vm), "r1", RestorePoint("rp-1", "t", "direct", "seed"))
            st = os.stat(vm.exports["vda"])
            assert stat.S_ISSOCK(st.st_mode)
            if who == "other":
                assert qemu is not None
                assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, qemu[1])
            else:
                assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.geteuid()
            _digest(vm.exports["vda"])  # the owner (vmdr's qemu-img create) still reads it
        finally:
            for p in vm.readers:
                site.stop(p)
