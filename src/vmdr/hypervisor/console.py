"""Console log files of a domain XML: find them, and move them for a restored copy.

A VM restored under a new name must not write its serial console into the original's
log file (QEMU would refuse to start, or both would clobber it).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from ._compat import parse_xml


def _file_elements(root: ET.Element) -> list[tuple[ET.Element, str]]:
    out: list[tuple[ET.Element, str]] = []
    devices = root.find("devices")
    if devices is None:
        return out
    for dev in list(devices.findall("serial")) + list(devices.findall("console")):
        log = dev.find("log")
        if log is not None and log.get("file"):
            out.append((log, "file"))
        src = dev.find("source")
        if dev.get("type") == "file" and src is not None and src.get("path"):
            out.append((src, "path"))
    return out


def console_log(xml: str) -> str | None:
    """The first console log file the domain writes, if any."""
    for el, attr in _file_elements(parse_xml(xml)):
        return el.get(attr)
    return None


def relocate_console_logs(xml: str, directory: str, name: str) -> str:
    """Point every console log file at ``directory/<name>-console[-N].log``."""
    root = parse_xml(xml)
    seen: dict[str, str] = {}
    for el, attr in _file_elements(root):
        old = el.get(attr) or ""
        if old not in seen:
            suffix = "" if not seen else f"-{len(seen)}"
            seen[old] = os.path.join(directory, f"{name}-console{suffix}.log")
        el.set(attr, seen[old])
    return ET.tostring(root, encoding="unicode")
