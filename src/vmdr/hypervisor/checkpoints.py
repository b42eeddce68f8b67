"""libvirt checkpoints named per repository, and whether an incremental is trustworthy.

How bitmaps are verified (the reliable check): for a running domain, the checkpoint XML
fetched with ``VIR_DOMAIN_CHECKPOINT_XML_SIZE`` makes libvirt query QEMU's dirty bitmaps;
a disk whose bitmap is missing or broken comes back *without* a ``size`` attribute.
Disk sizes at checkpoint time are stored in the checkpoint ``<description>`` so a resized
disk is detected. libvirt itself re-checks in ``backupBegin`` (VIR_ERR_CHECKPOINT_INCONSISTENT),
and the backup then retries as full.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vmdr.errors import CheckpointMissing

from ._compat import lv, parse_xml
from .domain import DiskInfo
from .errors import is_code, libvirt_errors

DESCRIPTION_TAG = "vmdr-disk-sizes:"


def checkpoint_name(prefix: str, now: datetime) -> str:
    """``<prefix>-<UTC timestamp, ms>``, e.g. ``vmdr-1a2b3c4d-20260101T120000.123Z``.

    Milliseconds matter: a checkpoint whose libvirt metadata was lost leaves its bitmap
    in the image, and QEMU refuses a new bitmap with the same name.
    """
    return f"{prefix}-{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z"


def is_ours(name: str, prefix: str) -> bool:
    """True if the checkpoint name was made by :func:`checkpoint_name` with this prefix."""
    pattern = re.escape(prefix) + r"-\d{8}T\d{6}(?:\.\d{3})?Z(?:-\d+)?"
    return re.fullmatch(pattern, name) is not None


def wants_bitmap(disk: DiskInfo) -> bool:
    """True if a checkpoint should put a bitmap on this disk."""
    return disk.imageable and disk.can_bitmap and not disk.readonly


def build_xml(name: str, all_disks: Iterable[DiskInfo], bitmap_targets: Iterable[str]) -> str:
    """The ``<domaincheckpoint>`` XML: bitmaps on ``bitmap_targets``, 'no' elsewhere."""
    want = set(bitmap_targets)
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = list(all_disks)
    sizes = {d.target: d.virtual_size for d in disks if d.target in want}
    ET.SubElement(root, "description").text = DESCRIPTION_TAG + json.dumps(sizes, sort_keys=True)
    el = ET.SubElement(root, "disks")
    for d in disks:
        ET.SubElement(el, "disk", name=d.target, checkpoint="bitmap" if d.target in want else "no")
    return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class CheckpointDisks:
    """What a checkpoint XML says about its disks."""

    bitmaps: dict[str, bool]  # target -> bitmap present (``size`` reported)
    sizes: dict[str, int | None]  # target -> virtual size at checkpoint time (our description)


def parse_checkpoint(xml: str) -> CheckpointDisks:
    """Disks with ``checkpoint='bitmap'`` and our stored sizes from a checkpoint XML."""
    root = parse_xml(xml)
    bitmaps = {
        d.get("name", ""): d.get("size") is not None
        for d in root.findall("./disks/disk")
        if d.get("checkpoint") == "bitmap"
    }
    sizes: dict[str, int | None] = {}
    desc = root.findtext("description") or ""
    if desc.startswith(DESCRIPTION_TAG):
        try:
            sizes = {k: (int(v) if v is not None else None)
                     for k, v in json.loads(desc[len(DESCRIPTION_TAG):]).items()}
        except (ValueError, AttributeError):
            sizes = {}
    return CheckpointDisks(bitmaps=bitmaps, sizes=sizes)


def decide(
    disks: Iterable[DiskInfo], prefix: str, incremental_from: str | None, sized_xml: str | None
) -> dict[str, str | None]:
    """Per disk target: None if an incremental from the checkpoint is safe, else why not.

    ``sized_xml`` is the checkpoint XML fetched with VIR_DOMAIN_CHECKPOINT_XML_SIZE, or
    None if libvirt has no such checkpoint.
    """
    disks = list(disks)
    if incremental_from is None:
        return {d.target: "no previous checkpoint" for d in disks}
    if not is_ours(incremental_from, prefix):
        return {d.target: f"checkpoint {incremental_from!r} is not a {prefix} checkpoint"
                for d in disks}
    if sized_xml is None:
        return {d.target: f"checkpoint {incremental_from!r} missing in libvirt" for d in disks}
    info = parse_checkpoint(sized_xml)
    out: dict[str, str | None] = {}
    for d in disks:
        if not wants_bitmap(d):
            out[d.target] = f"{d.format or 'unknown'} disk cannot carry a dirty bitmap"
        elif d.target not in info.bitmaps:
            out[d.target] = f"disk not in checkpoint {incremental_from!r} (added since?)"
        elif not info.bitmaps[d.target]:
            out[d.target] = f"bitmap of checkpoint {incremental_from!r} missing or broken"
        elif info.sizes.get(d.target) is None or info.sizes[d.target] != d.virtual_size:
            out[d.target] = "disk size changed since the checkpoint (or unknown)"
        else:
            out[d.target] = None
    return out


def offline_bitmaps(dom: Any, disks: Iterable[DiskInfo], prefix: str,
                    incremental_from: str | None) -> dict[str, str | None]:
    """Per disk target of a *stopped* domain: the qcow2 bitmap that holds its changes since
    checkpoint ``incremental_from`` (libvirt's persistent bitmap, saved in the image when
    QEMU stopped), or None to read the disk in full. libvirt cannot size bitmaps offline,
    so this only checks that the checkpoint is ours, covers the disk with a bitmap and
    recorded the disk's present size; a missing or inconsistent bitmap (QEMU did not stop
    cleanly) is refused by ``qemu-nbd --bitmap`` when it is opened, and the caller then
    reads that disk in full."""
    disks = list(disks)
    none: dict[str, str | None] = {d.target: None for d in disks}
    if incremental_from is None or not is_ours(incremental_from, prefix):
        return none
    cp = _lookup(dom, incremental_from)
    if cp is None:
        return none
    m = lv()
    with libvirt_errors(f"checkpoint {incremental_from}"):
        xml = str(cp.getXMLDesc(m.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    root = parse_xml(xml)
    sizes = parse_checkpoint(xml).sizes
    out = dict(none)
    for d in disks:
        el = next((e for e in root.findall("./disks/disk") if e.get("name") == d.target), None)
        if (el is None or el.get("checkpoint") != "bitmap" or not wants_bitmap(d)
                or d.virtual_size is None or sizes.get(d.target) != d.virtual_size):
            continue
        out[d.target] = el.get("bitmap") or incremental_from
    return out


def _lookup(dom: Any, name: str) -> Any:
    """The checkpoint object, or None if the domain has no checkpoint of that name."""
    try:
        return dom.checkpointLookupByName(name, 0)
    except lv().libvirtError as exc:
        if is_code(exc, "VIR_ERR_NO_DOMAIN_CHECKPOINT"):
            return None
        raise


def sized_xml(dom: Any, name: str) -> str | None:
    """Checkpoint XML with bitmap sizes (running domain), or None if it does not exist."""
    m = lv()
    cp = _lookup(dom, name)
    if cp is None:
        return None
    flags = m.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN | m.VIR_DOMAIN_CHECKPOINT_XML_SIZE
    try:
        return str(cp.getXMLDesc(flags))
    except m.libvirtError:
        # libvirt could not size the bitmaps (domain stopped, bitmap broken): trust none
        root = parse_xml(str(cp.getXMLDesc(m.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)))
        for disk in root.iter("disk"):
            disk.attrib.pop("size", None)
        return ET.tostring(root, encoding="unicode")


def full_xml(dom: Any, name: str) -> str:
    """The checkpoint XML including its ``<domain>``, as needed to redefine it later.

    Fetched without VIR_DOMAIN_CHECKPOINT_XML_SECURE: redefinition does not need secrets.
    """
    with libvirt_errors(f"checkpoint {name}"):
        return str(dom.checkpointLookupByName(name, 0).getXMLDesc(0))


def list_ours(dom: Any, prefix: str) -> list[str]:
    """Names of this prefix's checkpoints, oldest first."""
    with libvirt_errors("listing checkpoints"):
        cps = dom.listAllCheckpoints(0)
        names = [c.getName() for c in cps]
    ours = [n for n in names if is_ours(n, prefix)]
    return sorted(ours)


def delete(dom: Any, name: str) -> bool:
    """Delete one checkpoint (metadata only if its bitmaps are gone). False if absent."""
    m = lv()
    cp = _lookup(dom, name)
    if cp is None:
        return False
    try:
        cp.delete(0)
    except m.libvirtError as exc:
        if is_code(exc, "VIR_ERR_NO_DOMAIN_CHECKPOINT"):
            return False
        with libvirt_errors(f"deleting checkpoint {name}"):
            cp.delete(m.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    return True


def delete_others(dom: Any, prefix: str, keep: str) -> list[str]:
    """Delete this prefix's checkpoints except ``keep``; other prefixes are never touched."""
    deleted = []
    for name in list_ours(dom, prefix):
        if name != keep:
            with libvirt_errors(f"deleting checkpoint {name}"):
                if delete(dom, name):
                    deleted.append(name)
    return deleted


def redefine(dom: Any, xml: str, *, validate: bool) -> str:
    """Recreate libvirt metadata for a checkpoint whose bitmaps are still in the images."""
    m = lv()
    xml = drop_missing_parent(xml, {str(c.getName()) for c in dom.listAllCheckpoints(0)})
    flags = m.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if validate:
        flags |= m.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        cp = dom.checkpointCreateXML(xml, flags)
    except m.libvirtError as exc:
        if is_code(exc, "VIR_ERR_CHECKPOINT_INCONSISTENT"):
            raise CheckpointMissing(f"cannot redefine checkpoint: {exc}") from exc
        with libvirt_errors("redefining checkpoint"):
            raise
    return str(cp.getName())


def drop_missing_parent(xml: str, existing: set[str]) -> str:
    """Remove ``<parent>`` when that checkpoint is gone: libvirt refuses to redefine a
    checkpoint whose recorded parent does not exist (e.g. another tool deleted it)."""
    root = parse_xml(xml)
    parent = root.find("parent")
    name = parent.findtext("name") if parent is not None else None
    if parent is None or (name and name in existing):
        return xml
    root.remove(parent)
    return ET.tostring(root, encoding="unicode")
