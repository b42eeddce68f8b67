"""``vmdr ha test VM``: a failover test that does not disturb production.

1. Where would the VM go if its host failed now? The same decision as a real failover
   (:func:`vmdr.ha.failover.failover_plan` on the live fleet).
2. Its disks are held still for the length of the test (:meth:`frozen_disks`: a temporary
   overlay next to each image takes production's writes) and a qcow2 overlay over each
   frozen image is created on the shared storage for the copy.
3. The copy boots on the failover host as a *transient* domain named
   ``vmdr-hatest-<vm>-<stamp>``, without any network interface (no uplink, nothing it could
   answer or send on), with its own console log.
4. The test passes when the guest agent answers within ``timeout``; a screenshot is saved
   as evidence. The copy is destroyed and its overlays deleted whatever happened, and
   production's writes are merged back into its images (it ran throughout).
5. Crash safety: a state file is written before the freeze, and whatever a killed test
   left (production on the temporary overlay, the copy) is undone by the next test of the
   VM or ``--recover`` (:mod:`.hatest_state`).
6. A pass is recorded as ``ha/tests/<vm>`` (kind ``test``) and a ``tested`` event; a
   failure as a ``tested`` event only.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import HypervisorError, NoPlacement, UsageError
from vmdr.plan.inventory import Inventory
from vmdr.timeutil import utcnow

from .failover import failover_plan
from .fleet import Connect, live_state
from .hatest_state import GRACE, TestState, owner_alive, recover, remove_state, write_state
from .model import HAPolicy
from .records import FailoverRecord, HARecords

__all__ = ["HATestResult", "NoTarget", "recover_vm", "run_test", "test_xml"]

PREFIX = "vmdr-hatest-"
MakeOverlay = Callable[[str, str, str], None]  # (overlay path, backing path, backing format)


NoTarget = NoPlacement  # refused, nothing moved (exit 44)


@dataclass
class HATestResult:
    vm: str
    source: str
    target: str
    ok: bool = False
    start_s: float | None = None
    ready_s: float | None = None
    error: str | None = None
    evidence: list[str] = field(default_factory=list)
    copy: str = ""
    recovered: list[str] = field(default_factory=list)  # undone from an interrupted test

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "from": self.source, "to": self.target, "ok": self.ok,
                "copy": self.copy, "start_s": _r(self.start_s), "ready_s": _r(self.ready_s),
                "error": self.error, "evidence": self.evidence,
                "recovered": self.recovered}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _parse(text: str) -> ET.Element:
    """Domain XML from libvirt; DTDs and entities are refused."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise UsageError("domain XML with a DTD or entities is not accepted")
    return ET.fromstring(text)  # noqa: S314 - no DTD/entities, see above


def test_xml(xml: str, name: str, disks: dict[str, str], console_log: str) -> str:
    """The copy's definition: new name, no UUID, every NIC removed, ``disks`` (target ->
    qcow2 overlay) as its disks, file consoles to ``console_log``, fresh NVRAM and agent
    socket paths (libvirt picks them)."""
    root = _parse(xml)
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    for tag in ("uuid", "title", "description"):
        for el in root.findall(tag):
            root.remove(el)
    nvram = root.find("./os/nvram")
    if nvram is not None:
        nvram.text = None
    devices = root.find("devices")
    if devices is None:
        return ET.tostring(root, encoding="unicode")
    for el in list(devices):
        if el.tag == "interface":
            devices.remove(el)  # isolated: no uplink at all
    for disk in devices.findall("disk"):
        tgt = disk.find("target")
        dev = tgt.get("dev") if tgt is not None else None
        if disk.get("device", "disk") != "disk" or dev is None:
            continue
        if dev not in disks:
            devices.remove(disk)  # no shared or raw block disk is handed to the copy
            continue
        disk.set("type", "file")
        for bs in disk.findall("backingStore"):
            disk.remove(bs)
        src = disk.find("source")
        if src is None:
            src = ET.SubElement(disk, "source")
        src.attrib.clear()
        src.set("file", disks[dev])
        drv = disk.find("driver")
        if drv is None:
            drv = ET.SubElement(disk, "driver", name="qemu")
        drv.set("type", "qcow2")
    for tag in ("serial", "console"):
        for el in devices.findall(tag):
            if el.get("type") == "file":
                src = el.find("source")
                if src is not None:
                    src.set("path", console_log)
            log = el.find("log")
            if log is not None:
                log.set("file", console_log)
    for ch in devices.findall("channel"):
        src = ch.find("source")
        if ch.get("type") == "unix" and src is not None:
            src.attrib.pop("path", None)
    return ET.tostring(root, encoding="unicode")


def run_test(inv: Inventory, policy: HAPolicy, records: HARecords | None, connect: Connect,
             vm: str, *, make_overlay: MakeOverlay, evidence_dir: str,
             timeout: float = 300.0, clock: Callable[[], float] = time.monotonic,
             wall: Callable[[], datetime] = utcnow,
             alive: Callable[[TestState], bool] = owner_alive) -> HATestResult:
    """Run the test (see the module docstring); the result, also when it failed. What an
    interrupted earlier test of ``vm`` left is undone first (:mod:`.hatest_state`)."""
    if vm not in inv.vms:
        raise UsageError(f"unknown VM {vm!r}: not in the inventory")
    if vm not in policy.vms:
        raise UsageError(f"{vm} is not under HA (set ha = true on it or its tier): only HA "
                         "VMs are failover-tested")
    live = live_state(inv, connect, records)
    source = live.running.get(vm)
    if source is None:
        raise UsageError(f"{vm} is not running on any host of the inventory"
                         + (f" (unreachable: {', '.join(sorted(live.unreachable))})"
                            if live.unreachable else ""))
    plan = failover_plan(policy, live.state, {source})
    if vm not in plan.placement.placed:
        why = plan.placement.unplaced.get(vm, "not placed")
        raise NoTarget(f"{vm}: nowhere to fail over to if {source} failed: {why}")
    target = plan.placement.placed[vm]
    stamp = wall().strftime("%Y%m%dT%H%M%S")
    res = HATestResult(vm, source, target, copy=f"{PREFIX}{vm}-{stamp}")
    src_hv = connect(source)
    try:
        dom = src_hv.lookup(vm)
        statedir = _workdir(dom.xml())
        res.recovered = recover(connect, vm, source, statedir, alive=alive)
        xml = dom.xml(inactive=True)
        st = TestState(vm, source, target, res.copy, statedir, _file_disks(dom.xml()),
                       os.uname().nodename, os.getpid(), wall().timestamp(),
                       wall().timestamp() + timeout + GRACE)
        write_state(st)  # before the freeze: a killed run is undone by recover()
        try:
            with dom.frozen_disks(statedir) as frozen:
                if not frozen:
                    raise UsageError(f"{vm} has no file disk to test from")
                workdir = os.path.dirname(next(iter(frozen.values()))[0])
                _boot_copy(res, xml, frozen, workdir, connect, make_overlay, evidence_dir,
                           timeout, clock, wall)
        finally:
            # production must be back on its own images before the state file goes (a
            # safety net: frozen_disks() merged already unless its merge failed)
            dom.merge_frozen(statedir, st.originals)
            remove_state(statedir, vm)
    except HypervisorError as exc:
        res.ok, res.error = False, res.error or exc.message
    finally:
        src_hv.close()
    if records is not None:
        _record(records, res)
    return res


def _file_disks(xml: str) -> dict[str, tuple[str, str]]:
    """Disk target -> (image path, format) of the file disks (production's own images)."""
    out: dict[str, tuple[str, str]] = {}
    for disk in _parse(xml).findall("./devices/disk"):
        src, tgt, drv = disk.find("source"), disk.find("target"), disk.find("driver")
        if disk.get("device", "disk") == "disk" and src is not None and src.get("file") \
                and tgt is not None and tgt.get("dev"):
            out[tgt.get("dev", "")] = (src.get("file", ""),
                                       drv.get("type", "raw") if drv is not None else "raw")
    return out


def recover_vm(inv: Inventory, records: HARecords | None, connect: Connect, vm: str, *,
               alive: Callable[[TestState], bool] = owner_alive) -> list[str]:
    """``vmdr ha test VM --recover``: undo what an interrupted test of ``vm`` left, on the
    host running it now (else its inventory host); what was done."""
    if vm not in inv.vms:
        raise UsageError(f"unknown VM {vm!r}: not in the inventory")
    live = live_state(inv, connect, records)
    source = live.running.get(vm) or inv.vms[vm].host
    if source is None:
        raise UsageError(f"{vm} is not running and has no host in the inventory")
    hv = connect(source)
    try:
        statedir = _workdir(hv.lookup(vm).xml())
    finally:
        hv.close()
    done = recover(connect, vm, source, statedir, alive=alive)
    if done and records is not None:
        records.event("restored", f"{vm}: undid an interrupted failover test: "
                                  + "; ".join(done), host=source, vm=vm,
                      detail={"recovered": done})
    return done


def _workdir(xml: str) -> str:
    """The directory of the first file disk (the shared storage)."""
    root = _parse(xml)
    for disk in root.findall("./devices/disk"):
        src = disk.find("source")
        if disk.get("device", "disk") == "disk" and src is not None and src.get("file"):
            return os.path.dirname(src.get("file", ""))
    raise UsageError("the VM has no file disk on shared storage")


def _boot_copy(res: HATestResult, xml: str, frozen: dict[str, tuple[str, str]],
               workdir: str, connect: Connect, make_overlay: MakeOverlay, evidence_dir: str,
               timeout: float, clock: Callable[[], float],
               wall: Callable[[], datetime]) -> None:
    overlays = {t: os.path.join(workdir, f"{res.copy}-{t}.qcow2") for t in frozen}
    log = os.path.join(workdir, f"{res.copy}-console.log")
    hv = None
    try:
        for t, (path, fmt) in frozen.items():
            make_overlay(overlays[t], path, fmt)
        hv = connect(res.target)
        t0 = clock()
        copy = hv.create_transient(test_xml(xml, res.copy, overlays, log))
        res.start_s = clock() - t0
        try:
            res.ready_s = copy.wait_heartbeat(timeout=timeout)
            res.ok = True
        except HypervisorError as exc:
            res.error = f"the copy did not answer: {exc.message}"
        res.evidence += _screenshot(copy, evidence_dir, res.vm, wall)
        copy.destroy()
    finally:
        if hv is not None:
            hv.close()  # a transient domain also dies with its connection
        for p in [*overlays.values(), log]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as exc:
                res.error = (res.error + "; " if res.error else "") + \
                    f"could not remove {p}: {exc.strerror}"


def _screenshot(copy: Any, evidence_dir: str, vm: str,
                wall: Callable[[], datetime]) -> list[str]:
    try:
        shot = copy.console().screenshot()
    except HypervisorError:
        return []
    ext = {"image/png": "png", "image/x-portable-pixmap": "ppm"}.get(shot.mime, "bin")
    d = os.path.join(evidence_dir, vm)
    try:
        os.makedirs(d, mode=0o750, exist_ok=True)
        p = os.path.join(d, f"{wall().strftime('%Y%m%dT%H%M%SZ')}-hatest.{ext}")
        with open(p, "wb") as f:
            f.write(shot.data)
    except OSError:
        return []
    return [p]


def _record(records: HARecords, res: HATestResult) -> None:
    detail = res.to_json()
    if res.ok:
        records.set_test(FailoverRecord(res.vm, records.clock(), "test", res.source,
                                        res.target, res.start_s, res.ready_s))
        records.event("tested", f"failover test of {res.vm} passed: an isolated copy booted "
                                f"on {res.target} in {res.start_s or 0:.1f}s and answered "
                                f"after {res.ready_s or 0:.1f}s (production on {res.source} "
                                "kept running)", host=res.target, vm=res.vm, detail=detail)
    else:
        records.event("tested", f"failover test of {res.vm} FAILED on {res.target}: "
                                f"{res.error}", host=res.target, vm=res.vm, detail=detail)
