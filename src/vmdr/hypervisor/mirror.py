"""Moving a running domain's disks with libvirt block copy (QEMU drive-mirror) and pivot.

Used by instant recovery: the domain boots from local qcow2 overlays whose backing is an
NBD export of a snapshot; each disk is then copied *in full* (not shallow, so the NBD
backing is flattened into the copy) to a local qcow2, and libvirt pivots onto the copy.

libvirt 9.0 refuses ``virDomainBlockCopy`` on a persistent domain unless the flag
``VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB`` is given ("domain is not transient"): the flag
says the job need not survive a libvirtd restart. With it, the pivot updates both the
live and the persistent definition, so the domain stays defined on its new disks.

Disks that read from a remote backing are given ``error_policy='stop'`` and
``rerror_policy='stop'``: when the backing becomes unreachable QEMU pauses the guest
(state paused, reason I/O error) instead of passing errors to it. After the backing is
back, :func:`resume_after_io_error` resumes it; QEMU's NBD client reconnects to the same
socket path on the retried request (sometimes only on the second try).
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vmdr.errors import HypervisorError

from ._compat import lv, parse_xml
from .errors import is_code, libvirt_errors


@dataclass(frozen=True)
class CopyStatus:
    """One disk's block-copy job: bytes copied of the bytes to copy."""

    disk: str
    cur: int
    end: int
    active: bool

    @property
    def ready(self) -> bool:
        return self.active and self.end > 0 and self.cur == self.end


def _disks(root: ET.Element) -> Iterable[tuple[str, ET.Element]]:
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        dev = tgt.get("dev") if tgt is not None else None
        if dev:
            yield dev, disk


def set_error_policy(xml: str, disks: Iterable[str], policy: str = "stop") -> str:
    """Give ``disks`` ``error_policy``/``rerror_policy`` = ``policy`` (pause on I/O error)."""
    root = parse_xml(xml)
    wanted = set(disks)
    for dev, disk in _disks(root):
        if dev not in wanted:
            continue
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("error_policy", policy)
        driver.set("rerror_policy", policy)
    return ET.tostring(root, encoding="unicode")


Policies = dict[str, dict[str, str | None]]
POLICY_ATTRS = ("error_policy", "rerror_policy")


def error_policies(xml: str, disks: Iterable[str]) -> Policies:
    """Each disk's ``error_policy``/``rerror_policy`` (None: QEMU's default)."""
    wanted = set(disks)
    out: Policies = {}
    for dev, disk in _disks(parse_xml(xml)):
        if dev in wanted:
            driver = disk.find("driver")
            out[dev] = {a: driver.get(a) if driver is not None else None for a in POLICY_ATTRS}
    return out


def with_error_policies(xml: str, policies: Policies) -> str:
    """``xml`` with the disks' error policies set back to ``policies``."""
    root = parse_xml(xml)
    for dev, disk in _disks(root):
        driver = disk.find("driver")
        if dev not in policies or driver is None:
            continue
        for attr, value in policies[dev].items():
            if value is None:
                driver.attrib.pop(attr, None)
            else:
                driver.set(attr, value)
    return ET.tostring(root, encoding="unicode")


def nbd_backed_disks(xml: str) -> list[str]:
    """Targets whose source or any backing store is an NBD network source."""
    out = []
    for dev, disk in _disks(parse_xml(xml)):
        if any(src.get("protocol") == "nbd" for src in disk.iter("source")):
            out.append(dev)
    return sorted(out)


def disk_sources(xml: str) -> dict[str, str]:
    """Target → top image path (or network name) of each disk."""
    out = {}
    for dev, disk in _disks(parse_xml(xml)):
        src = disk.find("source")
        if src is not None:
            out[dev] = src.get("file") or src.get("dev") or src.get("name") or ""
    return out


def _dest_xml(path: str, fmt: str) -> str:
    disk = ET.Element("disk", type="file")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "driver", type=fmt)
    return ET.tostring(disk, encoding="unicode")


def start_copy(dom: Any, disk: str, dest: str, *, fmt: str = "qcow2",
               bandwidth: int | None = None) -> None:
    """Start a full (flattening) copy of ``disk`` to a new file ``dest`` that libvirt creates.

    ``bandwidth`` limits the copy in bytes/s (None: unlimited).
    """
    m = lv()
    params: dict[str, int] = {}
    if bandwidth:
        params[m.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = int(bandwidth)
    with libvirt_errors(f"copying disk {disk} to {dest}"):
        dom.blockCopy(disk, _dest_xml(dest, fmt), params or None,
                      m.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)


def copy_status(dom: Any, disk: str) -> CopyStatus:
    """The copy job's progress; ``active=False`` when no job runs on ``disk``."""
    with libvirt_errors(f"block job of {disk}"):
        info = dom.blockJobInfo(disk, 0)
    if not info:
        return CopyStatus(disk, 0, 0, False)
    return CopyStatus(disk, int(info.get("cur", 0)), int(info.get("end", 0)), True)


def pivot(dom: Any, disk: str) -> bool:
    """Switch ``disk`` onto its copy; False if the job is not ready yet (try again later)."""
    m = lv()
    try:
        dom.blockJobAbort(disk, m.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        return True
    except m.libvirtError as exc:
        if is_code(exc, "VIR_ERR_BLOCK_COPY_ACTIVE", "VIR_ERR_OPERATION_INVALID"):
            return False
        with libvirt_errors(f"pivoting disk {disk}"):
            raise


def cancel_copy(dom: Any, disk: str) -> None:
    """Abandon a copy job (the domain stays on its current disk); no error if none runs."""
    m = lv()
    try:
        if dom.blockJobInfo(disk, 0):
            dom.blockJobAbort(disk, 0)
    except m.libvirtError:
        pass


def paused_on_io_error(dom: Any) -> bool:
    """True if QEMU paused the domain because a disk returned an I/O error."""
    m = lv()
    with libvirt_errors("domain state"):
        state, reason = dom.state(0)
    return bool(state == m.VIR_DOMAIN_PAUSED and reason == m.VIR_DOMAIN_PAUSED_IOERROR)


def is_active(dom: Any) -> bool:
    with libvirt_errors("domain state"):
        return bool(dom.isActive())


def is_paused(dom: Any) -> bool:
    m = lv()
    with libvirt_errors("domain state"):
        return bool(dom.state(0)[0] == m.VIR_DOMAIN_PAUSED)


def suspend(dom: Any) -> None:
    """Pause a running domain (no error if it is already paused or off)."""
    m = lv()
    with libvirt_errors("pausing domain"):
        if dom.isActive() and dom.state(0)[0] == m.VIR_DOMAIN_RUNNING:
            dom.suspend()


def resume_after_io_error(
    dom: Any, *, attempts: int = 10, settle: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Resume a paused domain and make sure it stays running (retrying the failed I/O).

    QEMU's NBD client reconnects in the background after the first retried request fails,
    so the guest may pause again once; we resume until it stays up for ``settle`` seconds.
    """
    for _ in range(attempts):
        if is_paused(dom):
            with libvirt_errors("resuming domain"):
                dom.resume()
        sleep(settle)
        if not is_paused(dom):
            return
    raise HypervisorError(f"{dom.name()} pauses again on I/O errors: its disks' backing "
                          "is still unreachable")
