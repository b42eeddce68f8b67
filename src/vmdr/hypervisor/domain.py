"""Inspect a domain: :class:`DomainInfo` and its :class:`DiskInfo` list, parsed from XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ._compat import lv, parse_xml
from .errors import libvirt_errors

DiskType = Literal["file", "block", "network", "volume", "nvme", "vhostuser", "dir"]
State = Literal["running", "paused", "stopped", "other"]

# Disk formats that can carry persistent dirty bitmaps (checkpoints).
BITMAP_FORMATS = frozenset({"qcow2"})


@dataclass(frozen=True)
class DiskInfo:
    """One ``<disk>`` of a domain."""

    target: str
    source: str | None
    type: str
    format: str | None
    device: str = "disk"
    bus: str | None = None
    virtual_size: int | None = None
    shareable: bool = False
    readonly: bool = False
    skip_reason: str | None = None
    backing: bool = False  # the image has a backing chain (libvirt <backingStore> with a source)

    @property
    def imageable(self) -> bool:
        """True when vmdr can read this disk."""
        return self.skip_reason is None

    @property
    def can_bitmap(self) -> bool:
        """True when the disk can carry a persistent dirty bitmap (checkpoint)."""
        return self.format in BITMAP_FORMATS and self.type in ("file", "block", "volume")


@dataclass(frozen=True)
class DomainInfo:
    """What vmdr knows about one domain at inspection time."""

    name: str
    uuid: str
    state: State
    vcpus: int
    memory_kib: int
    xml: str
    disks: list[DiskInfo] = field(default_factory=list)
    nvram_path: str | None = None
    tpm_state_dir: str | None = None
    persistent: bool = True
    live_xml: str | None = None

    @property
    def running(self) -> bool:
        """True when a QEMU process exists (running or paused)."""
        return self.state in ("running", "paused")

    def disk(self, target: str) -> DiskInfo:
        """The disk with this target name (KeyError if none)."""
        for d in self.disks:
            if d.target == target:
                return d
        raise KeyError(target)


def _source_of(disk: ET.Element, dtype: str) -> str | None:
    src = disk.find("source")
    if src is None:
        return None
    if dtype == "file":
        return src.get("file")
    if dtype == "block":
        return src.get("dev")
    if dtype == "dir":
        return src.get("dir")
    if dtype == "network":
        proto = src.get("protocol", "?")
        name = src.get("name", "")
        host = src.find("host")
        where = f"{host.get('name')}:{host.get('port', '')}" if host is not None else ""
        return f"{proto}://{where}/{name}"
    if dtype == "volume":
        return f"{src.get('pool')}/{src.get('volume')}"
    if dtype == "nvme":
        addr = src.find("address")
        return f"nvme:{addr.attrib if addr is not None else ''}"
    return None


def classify(disk: DiskInfo) -> str | None:
    """Why this disk cannot be imaged, or None when it can."""
    if disk.device == "cdrom":
        return "cdrom"
    if disk.device == "floppy":
        return "floppy"
    if disk.device == "lun":
        return "device='lun' (SCSI passthrough)"
    if disk.shareable:
        return "shareable disk (another VM may write it)"
    if disk.source is None:
        return "no source"
    if disk.type in ("dir", "vhostuser", "nvme"):
        return f"type='{disk.type}' cannot be read"
    return None


def parse_disks(xml: str) -> list[DiskInfo]:
    """The disks of a domain XML, each with its ``skip_reason`` set."""
    root = parse_xml(xml)
    out: list[DiskInfo] = []
    for el in root.findall("./devices/disk"):
        target_el = el.find("target")
        if target_el is None or not target_el.get("dev"):
            continue
        dtype = el.get("type", "file")
        driver = el.find("driver")
        backing = el.find("backingStore")
        disk = DiskInfo(
            target=target_el.get("dev", ""),
            source=_source_of(el, dtype),
            type=dtype,
            format=driver.get("type") if driver is not None else None,
            device=el.get("device", "disk"),
            bus=target_el.get("bus"),
            shareable=el.find("shareable") is not None,
            readonly=el.find("readonly") is not None,
            backing=backing is not None and backing.find("source") is not None,
        )
        out.append(replace(disk, skip_reason=classify(disk)))
    return out


def parse_nvram(xml: str) -> str | None:
    """The NVRAM file path of a UEFI domain, if any."""
    el = parse_xml(xml).find("./os/nvram")
    if el is None:
        return None
    if el.text and el.text.strip():
        return el.text.strip()
    src = el.find("source")
    return src.get("file") if src is not None else None


def parse_tpm_dir(xml: str, uuid: str, system: bool) -> str | None:
    """The swtpm state directory of an emulated TPM, if any."""
    root = parse_xml(xml)
    backend = root.find("./devices/tpm/backend")
    if backend is None or backend.get("type") != "emulator":
        return None
    src = backend.find("source")
    if src is not None and src.get("path"):
        return src.get("path")
    return f"/var/lib/libvirt/swtpm/{uuid}" if system else None


def state_name(code: int) -> State:
    m = lv()
    if code in (m.VIR_DOMAIN_RUNNING, m.VIR_DOMAIN_BLOCKED):
        return "running"
    if code in (m.VIR_DOMAIN_PAUSED, m.VIR_DOMAIN_PMSUSPENDED):
        return "paused"
    if code in (m.VIR_DOMAIN_SHUTOFF, m.VIR_DOMAIN_CRASHED, m.VIR_DOMAIN_NOSTATE):
        return "stopped"
    return "other"


def inspect(dom: Any, *, system: bool = True) -> DomainInfo:
    """Build a :class:`DomainInfo` from a virDomain (libvirt errors translated)."""
    m = lv()
    with libvirt_errors("inspecting domain"):
        name = dom.name()
        uuid = dom.UUIDString()
        state, _reason = dom.state()
        info = dom.info()
        active = bool(dom.isActive())
        persistent = bool(dom.isPersistent())
        try:
            inactive_xml = dom.XMLDesc(m.VIR_DOMAIN_XML_INACTIVE | m.VIR_DOMAIN_XML_SECURE)
        except m.libvirtError:  # read-only connections may not get secure info
            inactive_xml = dom.XMLDesc(m.VIR_DOMAIN_XML_INACTIVE)
        live_xml = dom.XMLDesc(0) if active else None
    disks = []
    for d in parse_disks(live_xml or inactive_xml):
        size = None
        if d.imageable:
            try:
                size = int(dom.blockInfo(d.target)[0])
            except m.libvirtError:
                size = None
        disks.append(replace(d, virtual_size=size))
    return DomainInfo(
        name=name,
        uuid=uuid,
        state=state_name(state),
        vcpus=int(info[3]),
        memory_kib=int(info[1]),
        xml=inactive_xml,
        disks=disks,
        nvram_path=parse_nvram(inactive_xml),
        tpm_state_dir=parse_tpm_dir(inactive_xml, uuid, system),
        persistent=persistent,
        live_xml=live_xml,
    )
