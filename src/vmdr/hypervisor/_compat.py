"""Lazy access to the ``libvirt`` and ``libvirt_qemu`` modules, swappable for tests.

Unit tests call :func:`install` with ``tests/unit/fakelibvirt.py``; production code
imports the real bindings (python3-libvirt) on first use.
"""

from __future__ import annotations

import importlib
import xml.etree.ElementTree as ET
from types import ModuleType
from typing import Any

_libvirt: Any = None
_libvirt_qemu: Any = None


def lv() -> Any:
    """The libvirt module."""
    global _libvirt
    if _libvirt is None:
        import libvirt

        _libvirt = libvirt
    return _libvirt


def lvq() -> Any:
    """The libvirt_qemu module (guest agent and monitor commands)."""
    global _libvirt_qemu
    if _libvirt_qemu is None:
        _libvirt_qemu = importlib.import_module("libvirt_qemu")
    return _libvirt_qemu


def install(libvirt_module: ModuleType | Any, qemu_module: ModuleType | Any = None) -> None:
    """Use these modules instead of the real bindings (None: back to the real ones)."""
    global _libvirt, _libvirt_qemu
    _libvirt = libvirt_module
    _libvirt_qemu = qemu_module if qemu_module is not None else getattr(
        libvirt_module, "libvirt_qemu", None
    )


def parse_xml(text: str) -> ET.Element:
    """Parse libvirt or saved domain XML; DTDs and entities are refused."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("XML with a DTD or entities is not accepted")
    return ET.fromstring(text)  # noqa: S314 - no DTD/entities, see above
