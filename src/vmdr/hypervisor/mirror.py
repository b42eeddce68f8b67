"""Domain XML for moving a running domain's disks (block copy and pivot).

Used by instant recovery: the domain boots from local qcow2 overlays whose backing is an
NBD export of a snapshot; each disk is then copied *in full* (not shallow, so the NBD
backing is flattened into the copy) to a local qcow2 with
:meth:`~vmdr.hypervisor.driver.Domain.block_copy`, and the job pivots onto the copy.

Disks that read from a remote backing are given ``error_policy='stop'`` and
``rerror_policy='stop'``: when the backing becomes unreachable QEMU pauses the guest
(state paused, reason I/O error) instead of passing errors to it. After the backing is
back, :meth:`~vmdr.hypervisor.driver.Domain.resume_after_io_error` resumes it. QEMU's NBD
client reconnects to the same socket path only on requests (the first ones fail);
:meth:`~vmdr.hypervisor.driver.Domain.nbd_read` makes it read, to reconnect before the
guest or a copy needs the disk.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

from ._compat import parse_xml


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


def mirror_sockets(xml: str) -> dict[str, str]:
    """Target → the unix socket of the NBD destination of its running block copy
    (``<mirror>`` in the live XML); only disks that have one."""
    out = {}
    for dev, disk in _disks(parse_xml(xml)):
        for host in disk.findall("./mirror/source/host"):
            if host.get("socket"):
                out[dev] = str(host.get("socket"))
    return out
