"""The libvirt driver's handles: :class:`LibvirtDomain`, its block-copy jobs and console.

Each wraps a ``virDomain`` that never leaves this package; every libvirt call runs inside
:func:`~.errors.libvirt_errors`, so callers only ever see :mod:`vmdr.errors` exceptions.

Block copy (instant recovery): libvirt 9.0 refuses ``virDomainBlockCopy`` on a persistent
domain unless the flag ``VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB`` is given ("domain is not
transient"): the flag says the job need not survive a libvirtd restart. With it, the pivot
updates both the live and the persistent definition, so the domain stays defined on its
new disks.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from vmdr.errors import HypervisorUnsupported

from . import agent, domain, overlay
from ._compat import lv, lvq
from .console import console_log
from .domain import DomainInfo, State, state_name
from .driver import BlockCopyJob, Console, CopyStatus, Domain, GuestExecResult, Screenshot
from .errors import is_code, libvirt_errors
from .events import const_name


class LibvirtDomain(Domain):
    """A domain of a libvirt connection."""

    def __init__(self, dom: Any, *, system: bool = True) -> None:
        self._dom = dom
        self._system = system
        with libvirt_errors("domain"):
            self._name = str(dom.name())
            self._uuid = str(dom.UUIDString())

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    def info(self) -> DomainInfo:
        return domain.inspect(self._dom, system=self._system)

    def xml(self, *, inactive: bool = False, secure: bool = False) -> str:
        m = lv()
        flags = (m.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | \
            (m.VIR_DOMAIN_XML_SECURE if secure else 0)
        with libvirt_errors(f"reading the definition of {self._name}"):
            return str(self._dom.XMLDesc(flags))

    def is_active(self) -> bool:
        with libvirt_errors(f"state of {self._name}"):
            return bool(self._dom.isActive())

    def is_persistent(self) -> bool:
        with libvirt_errors(f"state of {self._name}"):
            return bool(self._dom.isPersistent())

    def autostart(self) -> bool:
        with libvirt_errors(f"autostart of {self._name}"):
            return bool(self._dom.autostart())

    def set_autostart(self, on: bool) -> None:
        with libvirt_errors(f"setting the autostart of {self._name}"):
            self._dom.setAutostart(1 if on else 0)

    def _state(self) -> tuple[int, int]:
        with libvirt_errors(f"state of {self._name}"):
            st = self._dom.state(0)
        return int(st[0]), int(st[1])

    def state(self) -> State:
        return state_name(self._state()[0])

    def paused_on_io_error(self) -> bool:
        m = lv()
        state, reason = self._state()
        return bool(state == m.VIR_DOMAIN_PAUSED and reason == m.VIR_DOMAIN_PAUSED_IOERROR)

    def state_reason(self) -> str:
        m = lv()
        state, reason = self._state()
        prefixes = {m.VIR_DOMAIN_SHUTOFF: "VIR_DOMAIN_SHUTOFF_",
                    m.VIR_DOMAIN_PAUSED: "VIR_DOMAIN_PAUSED_",
                    m.VIR_DOMAIN_CRASHED: "VIR_DOMAIN_CRASHED_",
                    m.VIR_DOMAIN_RUNNING: "VIR_DOMAIN_RUNNING_",
                    m.VIR_DOMAIN_SHUTDOWN: "VIR_DOMAIN_SHUTDOWN_",
                    m.VIR_DOMAIN_PMSUSPENDED: "VIR_DOMAIN_PMSUSPENDED_"}
        prefix = prefixes.get(state)
        name = const_name(m, prefix, reason) if prefix else ""
        return "" if name == "unknown" else name

    def reset(self) -> None:
        with libvirt_errors(f"resetting {self._name}"):
            self._dom.reset(0)

    def guest_exec(self, argv: Sequence[str], *, timeout: float = 30.0,
                   capture: bool = True) -> GuestExecResult:
        return agent.execute(self._dom, argv, timeout, capture=capture)

    def migrate(self, dest_uri: str, *, migrate_uri: str | None = None,
                unsafe: bool = False) -> None:
        m = lv()
        flags = (m.VIR_MIGRATE_LIVE | m.VIR_MIGRATE_PEER2PEER | m.VIR_MIGRATE_PERSIST_DEST
                 | m.VIR_MIGRATE_UNDEFINE_SOURCE | (m.VIR_MIGRATE_UNSAFE if unsafe else 0))
        params: dict[str, Any] = {}
        if migrate_uri:
            params[m.VIR_MIGRATE_PARAM_URI] = migrate_uri
        with libvirt_errors(f"migrating {self._name} to {dest_uri}"):
            self._dom.migrateToURI3(dest_uri, params, flags)

    @contextmanager
    def frozen_disks(self, workdir: str) -> Iterator[dict[str, tuple[str, str]]]:  # type: ignore[override]
        info = self.info()
        disks = [d for d in info.disks if d.device == "disk" and d.type == "file"
                 and d.source and not d.readonly and not d.shareable]
        frozen = {d.target: (d.source or "", d.format or "raw") for d in disks}
        if not info.running:
            yield frozen
            return
        overlays = {d.target: os.path.join(
            workdir, f"{self._name}-{d.target}{overlay.HATEST_MARK}") for d in disks}
        overlay.create(self._dom, info.disks, overlays, quiesce=False)
        try:
            yield frozen
        finally:
            for target in overlays:
                overlay.commit(self._dom, target)
            for path in overlays.values():
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def merge_frozen(self, workdir: str,
                     originals: dict[str, tuple[str, str]] | None = None) -> list[str]:
        return overlay.merge_leftovers(self._dom, workdir, overlay.HATEST_MARK,
                                       originals or {})

    def start(self) -> None:
        with libvirt_errors(f"starting {self._name}"):
            self._dom.create()

    def shutdown(self) -> None:
        m = lv()
        flags = m.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN | m.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
        with libvirt_errors(f"shutting down {self._name}"):
            if self._dom.isActive():
                self._dom.shutdownFlags(flags)

    def destroy(self) -> None:
        m = lv()
        try:
            if self._dom.isActive():
                self._dom.destroy()
        except m.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return  # a transient domain that is gone already
            with libvirt_errors(f"stopping {self._name}"):
                raise

    def undefine(self) -> None:
        m = lv()
        flags = (m.VIR_DOMAIN_UNDEFINE_NVRAM | m.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                 | m.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        with libvirt_errors(f"undefining {self._name}"):
            self._dom.undefineFlags(flags)

    def suspend(self) -> None:
        m = lv()
        with libvirt_errors(f"pausing {self._name}"):
            if self._dom.isActive() and self._dom.state(0)[0] == m.VIR_DOMAIN_RUNNING:
                self._dom.suspend()

    def resume(self) -> None:
        with libvirt_errors(f"resuming {self._name}"):
            self._dom.resume()

    def block_copy(self, disk: str, dest: str, *, fmt: str = "qcow2",
                   bandwidth: int | None = None) -> BlockCopyJob:
        m = lv()
        params: dict[str, int] = {}
        if bandwidth:
            params[m.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = int(bandwidth)
        el = ET.Element("disk", type="file")
        ET.SubElement(el, "source", file=dest)
        ET.SubElement(el, "driver", type=fmt)
        with libvirt_errors(f"copying disk {disk} to {dest}"):
            self._dom.blockCopy(disk, ET.tostring(el, encoding="unicode"), params or None,
                                m.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB)
        return LibvirtBlockCopyJob(self._dom, disk)

    def block_job(self, disk: str) -> BlockCopyJob:
        return LibvirtBlockCopyJob(self._dom, disk)

    def mirror_to_nbd(self, disk: str, socket: str, export: str, *,
                      synchronous: bool = False, bandwidth: int = 0) -> BlockCopyJob:
        # a network destination exists already (REUSE_EXT); no SHALLOW: the whole
        # guest-visible content goes over, then QEMU keeps it in step
        m = lv()
        el = ET.Element("disk", type="network")
        src = ET.SubElement(el, "source", protocol="nbd", name=export)
        ET.SubElement(src, "host", transport="unix", socket=socket)
        ET.SubElement(el, "driver", type="raw")
        flags = m.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB | m.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
        if synchronous:
            flags |= m.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES
        params: dict[str, int] = {}
        if bandwidth:
            params[m.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = int(bandwidth)  # bytes/s
        with libvirt_errors(f"mirroring disk {disk} to the NBD export {export}"):
            self._dom.blockCopy(disk, ET.tostring(el, encoding="unicode"), params or None,
                                flags)
        return LibvirtBlockCopyJob(self._dom, disk)

    def nbd_read(self, socket: str) -> bool:
        # QMP finds the node (libvirt names it, e.g. libvirt-4-storage); HMP's qemu-io
        # reads through it (it prints the outcome on QEMU's stdout, the domain log, not
        # in the reply). Monitor commands mark the domain "tainted: custom-monitor" in its
        # log; libvirt has no API that makes QEMU read a backing node.
        try:
            q = lvq()
        except ImportError:
            raise HypervisorUnsupported("reading an NBD backing needs libvirt_qemu "
                                        "(python3-libvirt)") from None
        with libvirt_errors(f"looking for the NBD client of {socket} in {self._name}"):
            nodes = json.loads(q.qemuMonitorCommand(
                self._dom, json.dumps({"execute": "query-named-block-nodes",
                                       "arguments": {"flat": True}}), 0))["return"]
        node = next((str(n["node-name"]) for n in nodes if n.get("drv") == "nbd"
                     and n.get("node-name") and socket in str(n.get("file", ""))), None)
        if node is None:
            return False
        with libvirt_errors(f"reading through {node} of {self._name}"):
            q.qemuMonitorCommand(self._dom, f'qemu-io {node} "read 0 512"',
                                 q.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        return True

    def guest_ping(self, timeout: int = 3) -> bool:
        return agent.ping(self._dom, timeout)

    def guest_addresses(self) -> list[str]:
        m = lv()
        for src in (m.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
                    m.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE):
            try:
                ifaces = self._dom.interfaceAddresses(src, 0) or {}
            except m.libvirtError:
                continue  # no agent, no lease: try the next source
            out = [str(a["addr"]) for name, info in ifaces.items() if name != "lo"
                   for a in (info.get("addrs") or [])
                   if a.get("type") == m.VIR_IP_ADDR_TYPE_IPV4
                   and not str(a.get("addr", "")).startswith("127.")]
            if out:
                return out
        return []

    def console(self) -> Console:
        return LibvirtConsole(self._dom, console_log(self.xml()))


class LibvirtBlockCopyJob(BlockCopyJob):
    def __init__(self, dom: Any, disk: str) -> None:
        super().__init__(disk)
        self._dom = dom

    def status(self) -> CopyStatus:
        m = lv()
        with libvirt_errors(f"block job of {self.disk}"):
            info = self._dom.blockJobInfo(self.disk,
                                          m.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
        if not info:
            return CopyStatus(self.disk, 0, 0, False)
        return CopyStatus(self.disk, int(info.get("cur", 0)), int(info.get("end", 0)), True,
                          int(info.get("bandwidth", 0)))

    def set_speed(self, bandwidth: int) -> None:
        m = lv()
        with libvirt_errors(f"setting the speed of the block job of {self.disk}"):
            self._dom.blockJobSetSpeed(self.disk, int(bandwidth),
                                       m.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)

    def pivot(self) -> bool:
        m = lv()
        try:
            self._dom.blockJobAbort(self.disk, m.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            return True
        except m.libvirtError as exc:
            if is_code(exc, "VIR_ERR_BLOCK_COPY_ACTIVE", "VIR_ERR_OPERATION_INVALID"):
                return False
            with libvirt_errors(f"pivoting disk {self.disk}"):
                raise

    def cancel(self) -> None:
        m = lv()
        try:
            if self._dom.blockJobInfo(self.disk, 0):
                self._dom.blockJobAbort(self.disk, 0)
        except m.libvirtError:
            pass  # no job, or it ended meanwhile: nothing to cancel


class LibvirtConsole(Console):
    def __init__(self, dom: Any, log_path: str | None) -> None:
        super().__init__(log_path)
        self._dom = dom

    def screenshot(self) -> Screenshot:
        m = lv()
        with libvirt_errors("taking a screenshot"):
            stream = self._dom.connect().newStream(0)
            try:
                mime = str(self._dom.screenshot(stream, 0, 0) or "")
                parts: list[bytes] = []
                stream.recvAll(lambda _st, data, acc: acc.append(data) or len(data), parts)
                stream.finish()
            except BaseException:
                try:
                    stream.abort()
                except m.libvirtError:
                    pass
                raise
        return Screenshot(mime, b"".join(parts))
