"""Delta-mode fallback: a temporary external overlay, then active blockcommit + pivot.

While the overlay takes the guest's writes, the original image is frozen and can be read
directly. The overlay lives in vmdr's scratch directory with a recognisable name so a
leftover one (vmdr killed) is found and merged back by :mod:`.cleanup`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

from vmdr.errors import HypervisorError

from ._compat import lv, parse_xml
from .domain import DiskInfo, parse_disks
from .errors import is_code, libvirt_errors

OVERLAY_SUFFIX = ".vmdr-overlay.qcow2"
HATEST_MARK = ".hatest" + OVERLAY_SUFFIX  # frozen_disks() overlays (vmdr ha test)


def overlay_path(workdir: str, target: str) -> str:
    """Where the overlay of disk ``target`` goes."""
    return os.path.join(workdir, f"{target}{OVERLAY_SUFFIX}")


def is_overlay(path: str | None, scratch_dir: str) -> bool:
    """True if ``path`` is a vmdr overlay inside ``scratch_dir``."""
    if not path or not path.endswith(OVERLAY_SUFFIX):
        return False
    root = os.path.realpath(scratch_dir)
    return os.path.realpath(path).startswith(root + os.sep)


def active_overlays(xml: str, scratch_dir: str) -> dict[str, str]:
    """Disk target -> overlay path, for disks currently running on a vmdr overlay."""
    return {d.target: d.source for d in parse_disks(xml)
            if d.source is not None and is_overlay(d.source, scratch_dir)}


def snapshot_xml(all_disks: Iterable[DiskInfo], overlays: dict[str, str]) -> str:
    """A disk-only ``<domainsnapshot>`` putting overlays on ``overlays``' disks only."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = "vmdr-overlay"
    ET.SubElement(root, "description").text = "vmdr temporary overlay (deleted after backup)"
    disks = ET.SubElement(root, "disks")
    for d in all_disks:
        if d.target in overlays:
            el = ET.SubElement(disks, "disk", name=d.target, snapshot="external", type="file")
            ET.SubElement(el, "driver", type="qcow2")
            ET.SubElement(el, "source", file=overlays[d.target])
        elif d.device == "disk" and d.source is not None:
            ET.SubElement(disks, "disk", name=d.target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def create(dom: Any, all_disks: Iterable[DiskInfo], overlays: dict[str, str], *,
           quiesce: bool) -> None:
    """Put the overlays in place (atomic: all or none)."""
    m = lv()
    flags = (m.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | m.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
             | m.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    if quiesce:
        flags |= m.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    with libvirt_errors("creating overlay snapshot"):
        dom.snapshotCreateXML(snapshot_xml(all_disks, overlays), flags)


def commit(dom: Any, target: str, *, timeout: float = 3600.0, poll: float = 0.05) -> None:
    """Merge the active overlay of ``target`` into its backing image and pivot back."""
    m = lv()
    flags = m.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | m.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
    with libvirt_errors(f"blockcommit {target}"):
        info = dom.blockJobInfo(target, 0)
        if not info:
            dom.blockCommit(target, None, None, 0, flags)
    deadline = time.monotonic() + timeout
    while True:
        with libvirt_errors(f"blockcommit {target}"):
            info = dom.blockJobInfo(target, 0)
        if not info:
            raise HypervisorError(f"blockcommit of {target} vanished before it was ready")
        if info.get("end", -1) >= 0 and info.get("cur") == info.get("end"):
            try:
                dom.blockJobAbort(target, m.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                return
            except m.libvirtError as exc:
                if not is_code(exc, "VIR_ERR_BLOCK_COPY_ACTIVE", "VIR_ERR_OPERATION_INVALID"):
                    with libvirt_errors(f"pivot {target}"):
                        raise
        if time.monotonic() > deadline:
            with libvirt_errors(f"aborting blockcommit {target}"):
                dom.blockJobAbort(target, 0)
            raise HypervisorError(f"blockcommit of {target} not ready after {timeout:.0f}s")
        time.sleep(poll)


def backing_of(path: str) -> tuple[str, str]:
    """(backing path, backing format) of an overlay file, via ``qemu-img info``."""
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", path],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise HypervisorError(f"qemu-img info {path}: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if not backing:
        raise HypervisorError(f"{path} has no backing file")
    return str(backing), str(info.get("backing-filename-format") or "raw")


def commit_offline(path: str) -> None:
    """``qemu-img commit`` an overlay of a stopped domain into its backing file."""
    out = subprocess.run(["qemu-img", "commit", "-q", path], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise HypervisorError(f"qemu-img commit {path}: {out.stderr.strip()}")


def restore_sources(xml: str, originals: dict[str, tuple[str, str]]) -> str:
    """Domain XML with the disks of ``originals`` pointed back at (path, format)."""
    root = parse_xml(xml)
    for el in root.findall("./devices/disk"):
        tgt = el.find("target")
        if tgt is None or tgt.get("dev") not in originals:
            continue
        path, fmt = originals[tgt.get("dev", "")]
        el.set("type", "file")
        src = el.find("source")
        if src is None:
            src = ET.SubElement(el, "source")
        src.attrib.clear()
        src.set("file", path)
        drv = el.find("driver")
        if drv is not None:
            drv.set("type", fmt)
        for bs in el.findall("backingStore"):
            el.remove(bs)
    return ET.tostring(root, encoding="unicode")


def create_file(path: str, backing: str, backing_fmt: str) -> None:
    """``qemu-img create`` a qcow2 overlay at ``path`` over ``backing`` (kept read-only)."""
    out = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F",
                          backing_fmt, path], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise HypervisorError(f"qemu-img create {path}: {out.stderr.strip()}")


def merge_leftovers(dom: Any, workdir: str, mark: str,
                    originals: dict[str, tuple[str, str]]) -> list[str]:
    """Merge back the overlays in ``workdir`` whose names end in ``mark`` that the domain
    runs or is defined on (their process died): active commit + pivot when running,
    ``qemu-img commit`` when stopped; the persistent definition is pointed back at the
    originals (``originals``, else each overlay's backing file) and the overlays deleted.
    What was done (empty: nothing was left)."""
    m = lv()
    with libvirt_errors("inspecting domain"):
        active = bool(dom.isActive())
        persistent = bool(dom.isPersistent())
        live = dom.XMLDesc(0) if active else ""
        inactive = dom.XMLDesc(m.VIR_DOMAIN_XML_INACTIVE | m.VIR_DOMAIN_XML_SECURE) \
            if persistent else ""

    def ours(xml: str) -> dict[str, str]:
        return {t: p for t, p in active_overlays(xml, workdir).items() if p.endswith(mark)}

    running, stale = ours(live), ours(inactive)
    orig = dict(originals)
    for target, path in {**stale, **running}.items():
        if target not in orig and os.path.exists(path):
            orig[target] = backing_of(path)
    done: list[str] = []
    for target in running:
        commit(dom, target)
        done.append(f"merged leftover overlay of {target} into its image (blockcommit + "
                    "pivot)")
    if persistent:
        with libvirt_errors("reading domain XML"):
            inactive = dom.XMLDesc(m.VIR_DOMAIN_XML_INACTIVE | m.VIR_DOMAIN_XML_SECURE)
        stale = ours(inactive)  # libvirt may have fixed it on pivot
    if stale:
        for target, path in stale.items():
            if target not in orig:
                raise HypervisorError(f"{path} is gone and its original image is unknown; "
                                      f"repair the definition of disk {target} by hand")
            if not active and os.path.exists(path):
                commit_offline(path)
                done.append(f"committed leftover overlay of {target} (domain stopped)")
        with libvirt_errors("redefining domain without overlays"):
            dom.connect().defineXML(restore_sources(inactive, {t: orig[t] for t in stale}))
        done += [f"pointed the definition of {t} back at {orig[t][0]}" for t in stale]
    for path in {**stale, **running}.values():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return done
