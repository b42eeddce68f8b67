"""Domain XML rewriting for restore: new identity, new disk paths, no runtime leftovers."""

from __future__ import annotations

import os
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping

from ._compat import parse_xml as parse_xml  # re-exported: the one safe domain-XML parser

# Runtime-only attributes that libvirt adds to a live or status XML.
_RUNTIME_ATTRS = {"source": ("index",), "backingStore": ("index",)}


def random_mac(rand: Callable[[int], bytes] = os.urandom) -> str:
    """A locally administered MAC in QEMU's 52:54:00 range."""
    b = rand(3)
    return "52:54:00:" + ":".join(f"{x:02x}" for x in b)


def domain_name(xml: str) -> str:
    """The ``<name>`` of a domain XML."""
    return parse_xml(xml).findtext("name") or ""


def domain_uuid(xml: str) -> str | None:
    """The ``<uuid>`` of a domain XML, if any."""
    return parse_xml(xml).findtext("uuid")


def _strip_runtime(root: ET.Element) -> None:
    root.attrib.pop("id", None)
    for tag in ("privateData", "seclabel"):
        for parent in list(root.iter()):
            for child in list(parent):
                if child.tag == tag and (tag != "seclabel" or child.get("type") == "dynamic"
                                         or child.find("imagelabel") is not None):
                    parent.remove(child)
    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag == "alias" and not (child.get("name") or "").startswith("ua-"):
                parent.remove(child)
    for el in root.iter():
        for attr in _RUNTIME_ATTRS.get(el.tag, ()):
            el.attrib.pop(attr, None)
    for g in root.iter("graphics"):
        if g.get("autoport") == "yes":
            g.attrib.pop("port", None)
            g.attrib.pop("websocket", None)
    for iface in root.iter("interface"):
        tgt = iface.find("target")
        if tgt is not None and (tgt.get("dev") or "").startswith(("vnet", "macvtap")):
            iface.remove(tgt)
    for tag in ("serial", "console", "parallel", "channel"):
        for el in root.iter(tag):
            if el.get("type") == "pty":
                el.attrib.pop("tty", None)
                src = el.find("source")
                if src is not None:
                    el.remove(src)


def _set_disk_source(disk: ET.Element, path: str, fmt: str) -> None:
    block = path.startswith("/dev/")
    disk.set("type", "block" if block else "file")
    for child in list(disk):
        if child.tag in ("source", "backingStore", "auth", "encryption"):
            disk.remove(child)
    src = ET.Element("source", {"dev" if block else "file": path})
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", fmt)
    disk.insert(list(disk).index(driver) + 1, src)


def rewrite_domain_xml(
    xml: str,
    *,
    new_name: str | None = None,
    new_uuid: bool | None = None,
    new_macs: bool | None = None,
    disk_paths: Mapping[str, tuple[str, str]] | None = None,
    nvram_path: str | None = None,
    rand: Callable[[int], bytes] = os.urandom,
) -> str:
    """A domain XML ready to ``define`` for a restore.

    ``new_uuid``/``new_macs`` default to True when ``new_name`` is given (a clone must not
    collide with the original). ``disk_paths`` maps a target to (path, format).
    ``nvram_path`` points ``<os><nvram>`` at the restored NVRAM file. Runtime bits (ids,
    aliases, dynamic security labels, pty paths, source indexes, backing chains of
    rewritten disks) are always stripped.
    """
    root = parse_xml(xml)
    if root.tag != "domain":
        raise ValueError("not a <domain> XML")
    if new_uuid is None:
        new_uuid = new_name is not None
    if new_macs is None:
        new_macs = new_name is not None
    _strip_runtime(root)
    if new_name is not None:
        name = root.find("name")
        if name is None:
            name = ET.SubElement(root, "name")
        name.text = new_name
    if new_uuid:
        u = root.find("uuid")
        if u is None:
            u = ET.Element("uuid")
            root.insert(1, u)
        u.text = str(uuidlib.UUID(bytes=rand(16), version=4))
    if new_macs:
        for iface in root.iter("interface"):
            mac = iface.find("mac")
            if mac is None:
                mac = ET.SubElement(iface, "mac")
            mac.set("address", random_mac(rand))
    if disk_paths:
        seen = set()
        for disk in root.findall("./devices/disk"):
            tgt = disk.find("target")
            dev = tgt.get("dev") if tgt is not None else None
            if dev is not None and dev in disk_paths:
                path, fmt = disk_paths[dev]
                _set_disk_source(disk, path, fmt)
                seen.add(dev)
        missing = set(disk_paths) - seen
        if missing:
            raise ValueError(f"no disk {', '.join(sorted(missing))} in the domain XML")
    if nvram_path is not None:
        os_el = root.find("os")
        nv = os_el.find("nvram") if os_el is not None else None
        if os_el is None:
            raise ValueError("domain has no <os> element")
        if nv is None:
            nv = ET.SubElement(os_el, "nvram")
        for child in list(nv):
            nv.remove(child)
        nv.attrib.pop("type", None)
        nv.text = nvram_path
    return ET.tostring(root, encoding="unicode")


def interface_networks(xml: str) -> list[str]:
    """The virtual networks the domain's ``<interface type='network'>`` NICs use, in order,
    each once."""
    out: list[str] = []
    for iface in parse_xml(xml).findall("./devices/interface"):
        src = iface.find("source")
        net = src.get("network") if src is not None and iface.get("type") == "network" else None
        if net and net not in out:
            out.append(net)
    return out


def map_networks(xml: str, mapping: Mapping[str, str]) -> str:
    """The domain XML with each ``<interface type='network'>`` moved from network ``a`` to
    ``mapping[a]`` (networks not in ``mapping`` stay as they are)."""
    root = parse_xml(xml)
    for iface in root.findall("./devices/interface"):
        src = iface.find("source")
        if iface.get("type") == "network" and src is not None:
            net = src.get("network") or ""
            if net in mapping:
                src.set("network", mapping[net])
                src.attrib.pop("portid", None)
                src.attrib.pop("bridge", None)
    return ET.tostring(root, encoding="unicode")


def set_uuid(xml: str, uuid: str) -> str:
    """The domain XML with ``<uuid>`` set to ``uuid`` (a standby keeps its own UUID when
    it is defined again)."""
    root = parse_xml(xml)
    u = root.find("uuid")
    if u is None:
        u = ET.Element("uuid")
        root.insert(1, u)
    u.text = uuid
    return ET.tostring(root, encoding="unicode")


def dac_identity(capabilities_xml: str) -> tuple[int, int] | None:
    """The ``(uid, gid)`` of QEMU from a host's capabilities XML: the DAC security model's
    base label (``<baselabel type='kvm'>+64055:+64055</baselabel>``, ``+0:+0`` when
    qemu.conf says ``user = "root"``); None when the host reports no DAC model (a session
    instance: QEMU runs as the connecting user)."""
    root = parse_xml(capabilities_xml)
    for model in root.findall("./host/secmodel"):
        if (model.findtext("model") or "").strip() != "dac":
            continue
        labels = {b.get("type", ""): (b.text or "").strip() for b in model.findall("baselabel")}
        label = labels.get("kvm") or labels.get("qemu") or next(iter(labels.values()), "")
        uid, _, gid = label.partition(":")
        try:
            return int(uid.lstrip("+")), int(gid.lstrip("+"))
        except ValueError:
            return None
    return None
