"""Disk classification and domain inspection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import DomainNotFound, HypervisorUnavailable, UsageError
from vmdr.hypervisor import LibvirtHypervisor, connect, parse_disks
from vmdr.hypervisor.domain import parse_nvram, parse_tpm_dir


@pytest.fixture
def fake() -> Iterator[Any]:
    yield fl.install()
    fl.uninstall()


DISKS = (
    fl.disk_xml("vda", "/img/a.qcow2")
    + fl.disk_xml("vdb", "/dev/vg/b", fmt="raw", dtype="block")
    + fl.disk_xml("sda", None, fmt="raw", device="cdrom")
    + fl.disk_xml("sdb", "/iso/x.iso", fmt="raw", device="cdrom")
    + fl.disk_xml("sdc", "/dev/sdz", fmt="raw", device="lun", dtype="block")
    + fl.disk_xml("vdc", "/img/shared.raw", fmt="raw", extra="<shareable/>")
    + fl.disk_xml("vdd", "/img/ro.qcow2", extra="<readonly/>")
    + "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
    "<source protocol='rbd' name='pool/img'><host name='mon1' port='6789'/></source>"
    "<target dev='vde' bus='virtio'/></disk>"
    + fl.disk_xml("vdf", None)
)


def test_classification() -> None:
    disks = {d.target: d for d in parse_disks(fl.domain_xml("x", DISKS))}
    assert disks["vda"].skip_reason is None and disks["vda"].can_bitmap
    assert disks["vdb"].type == "block" and disks["vdb"].source == "/dev/vg/b"
    assert disks["vdb"].skip_reason is None and not disks["vdb"].can_bitmap
    assert disks["sda"].skip_reason == "cdrom"
    assert disks["sdb"].skip_reason == "cdrom"
    assert "lun" in (disks["sdc"].skip_reason or "")
    assert "shareable" in (disks["vdc"].skip_reason or "")
    assert disks["vdd"].readonly and disks["vdd"].skip_reason is None
    assert disks["vde"].type == "network" and disks["vde"].source == "rbd://mon1:6789/pool/img"
    assert disks["vde"].skip_reason is None  # QEMU reads it in pull mode
    assert disks["vdf"].skip_reason == "no source"


def test_nvram_and_tpm_paths() -> None:
    xml = ("<domain><name>u</name><os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/u.fd"
           "</nvram></os><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/>"
           "</tpm></devices></domain>")
    assert parse_nvram(xml) == "/var/lib/libvirt/qemu/nvram/u.fd"
    assert parse_tpm_dir(xml, "U-1", system=True) == "/var/lib/libvirt/swtpm/U-1"
    assert parse_tpm_dir(xml, "U-1", system=False) is None
    plain = fl.domain_xml("p", "")
    assert parse_nvram(plain) is None and parse_tpm_dir(plain, "u", True) is None


def test_inspect_running_domain(fake: Any) -> None:
    fl.add_domain(fl.domain_xml("web", DISKS, uuid="11111111-2222-3333-4444-555555555555"),
                  sizes={"vda": 10 << 30, "vdb": 5 << 30})
    hv = connect("qemu:///system")
    info = hv.domain("web")
    assert info.name == "web" and info.state == "running" and info.running
    assert info.uuid == "11111111-2222-3333-4444-555555555555"
    assert info.vcpus == 2 and info.memory_kib == 1048576
    assert info.disk("vda").virtual_size == 10 << 30
    assert info.disk("sda").virtual_size is None  # skipped disks are not sized
    assert hv.domain(info.uuid).name == "web"  # lookup by UUID too
    assert hv.list_domains() == ["web"]


def test_stopped_state(fake: Any) -> None:
    fl.add_domain(fl.domain_xml("off", fl.disk_xml("vda", "/a.qcow2")), active=False)
    info = connect().domain("off")
    assert info.state == "stopped" and not info.running and info.live_xml is None


def test_missing_domain_and_bad_uri(fake: Any) -> None:
    fl.host("qemu:///system")
    with pytest.raises(DomainNotFound):
        connect().domain("nope")
    with pytest.raises(HypervisorUnavailable):
        connect("qemu+ssh://nohost/system")


def test_read_nvram_and_tpm_state(fake: Any, tmp_path: Any) -> None:
    import io
    import tarfile

    nv = tmp_path / "u_VARS.fd"
    nv.write_bytes(b"EFI" * 100)
    tpm = tmp_path / "swtpm"
    (tpm / "tpm2").mkdir(parents=True)
    (tpm / "tpm2" / "tpm2-00.permall").write_bytes(b"state")
    xml = (f"<domain><name>u</name><os><type>hvm</type><nvram>{nv}</nvram></os><devices>"
           f"<tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
           f"<source type='dir' path='{tpm}'/></backend></tpm></devices></domain>")
    fl.add_domain(xml)
    hv = connect()
    info = hv.domain("u")
    assert info.nvram_path == str(nv) and info.tpm_state_dir == str(tpm)
    assert hv.read_nvram(info) == b"EFI" * 100
    blob = hv.read_tpm_state(info)
    assert blob is not None
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.extractfile("./tpm2/tpm2-00.permall")
        assert member is not None and member.read() == b"state"
    nv.unlink()
    assert hv.read_nvram(info) is None
    remote = LibvirtHypervisor(fl.host(), "qemu+tcp://far/system")
    with pytest.raises(UsageError, match=r"reading TPM state: .*qemu\+ssh://"):
        remote.read_tpm_state(info)
