"""Remove orphaned dirty bitmaps: vmdr's own bitmaps whose libvirt checkpoint is gone.

A checkpoint whose libvirt metadata was lost (and never redefined) leaves its persistent
bitmap in the qcow2 image, tracking writes forever. When a full backup has replaced it
(the session committed a new checkpoint, or read a stopped domain in full), vmdr removes
bitmaps that

* are named like this repository's checkpoints (:func:`.checkpoints.is_ours` with the
  session's prefix: other repositories' and other tools' bitmaps are never touched), and
* have no libvirt checkpoint of that name (libvirt's list is read just before).

Running domain: QMP ``query-named-block-nodes`` / ``block-dirty-bitmap-remove`` through
``virDomainQemuMonitorCommand`` on writable nodes only (libvirt has no API for this; it
marks the domain "custom-monitor" tainted in its log, which is why it only runs for full
backups). Stopped domain: ``qemu-img info`` / ``qemu-img bitmap --remove`` on the image,
on the hypervisor host (which takes QEMU's write lock: it fails if the VM was started).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vmdr.errors import HypervisorError

from . import checkpoints
from ._compat import lv, lvq
from .domain import DiskInfo

Run = Callable[[Sequence[str]], tuple[int, str, str]]  # argv -> (rc, stdout, stderr)


def qmp(dom: Any, execute: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command through libvirt; its ``return`` value."""
    cmd: dict[str, Any] = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    try:
        reply = lvq().qemuMonitorCommand(dom, json.dumps(cmd), 0)
    except lv().libvirtError as exc:
        raise HypervisorError(f"QMP {execute}: {exc}") from exc
    data = json.loads(reply)
    if "error" in data:
        raise HypervisorError(f"QMP {execute}: {data['error'].get('desc', 'failed')}")
    return data.get("return")


def orphans(names: Iterable[tuple[str, str]], prefix: str,
            known: set[str]) -> list[tuple[str, str]]:
    """(where, bitmap) pairs that are ours by name and unknown to libvirt."""
    return [(w, n) for w, n in names if checkpoints.is_ours(n, prefix) and n not in known]


def remove_running(dom: Any, prefix: str) -> list[str]:
    """Remove orphaned bitmaps from a running domain's writable block nodes."""
    known = set(checkpoints.list_ours(dom, prefix))
    nodes = qmp(dom, "query-named-block-nodes", {"flat": True}) or []
    found = [(str(n.get("node-name", "")), str(b.get("name", "")))
             for n in nodes if not n.get("ro")
             for b in n.get("dirty-bitmaps", []) if b.get("persistent", True)]
    done = []
    for node, name in orphans(found, prefix, known):
        qmp(dom, "block-dirty-bitmap-remove", {"node": node, "name": name})
        done.append(name)
    return done


def remove_offline(dom: Any, disks: Iterable[DiskInfo], prefix: str, run: Run) -> list[str]:
    """Remove orphaned bitmaps from a stopped domain's qcow2 images (``run`` executes
    qemu-img on the hypervisor host)."""
    known = set(checkpoints.list_ours(dom, prefix))
    done = []
    for d in disks:
        if d.format != "qcow2" or d.source is None or d.readonly:
            continue
        rc, out, err = run(["qemu-img", "info", "-f", "qcow2", "--output=json", "--", d.source])
        if rc != 0:
            raise HypervisorError(f"qemu-img info {d.target}: {err.strip() or rc}")
        spec = (json.loads(out).get("format-specific") or {}).get("data") or {}
        found = [(d.source, str(b.get("name", ""))) for b in spec.get("bitmaps", [])]
        for path, name in orphans(found, prefix, known):
            rc, _o, err = run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", "--", path, name])
            if rc != 0:
                raise HypervisorError(f"qemu-img bitmap --remove {d.target}: {err.strip()}")
            done.append(f"{d.target}:{name}")
    return done


def remove_after_full(dom: Any, offline: bool, disks: Sequence[DiskInfo], prefix: str,
                      run: Run, warnings: list[str]) -> list[str]:
    """Remove orphans after a full backup; failures become a warning (never fatal)."""
    try:
        done = remove_offline(dom, disks, prefix, run) if offline else \
            remove_running(dom, prefix)
    except (HypervisorError, OSError, ValueError) as exc:
        warnings.append(f"could not remove orphaned bitmaps: {exc}")
        return []
    if done:
        warnings.append("removed bitmaps of lost checkpoints: " + ", ".join(done))
    return done
