"""An in-memory hypervisor driver: unit tests and simulated fleets (no libvirt, no QEMU).

A :class:`FakeFleet` holds hosts by URI; each :class:`FakeHost` holds domains and
networks as plain records that a test or simulator sets up and inspects directly.
:meth:`FakeFleet.connect` returns a :class:`FakeHypervisor`, which implements
:class:`~vmdr.hypervisor.driver.Hypervisor` and passes the same contract suite as the
libvirt driver (``tests/unit/test_hypervisor_contract.py``) for what it models:

* domains: define, start, destroy, undefine, suspend, resume, inspection from the XML
  (disks, vCPUs, memory), transient domains destroyed when their connection closes;
* block copy: a job advances ``copy_step`` bytes per :meth:`~FakeBlockCopyJob.status`
  call (None: done at once) and the pivot rewrites the disk's source in the live and
  persistent XML; a disk in ``failing_copies`` loses its job (the copy failed);
* guest agent (``agent``), guest addresses, the screen, pausing on an I/O error
  (:meth:`FakeDomainRecord.pause_on_io_error`);
* networks, and whole hosts going down (``host.up = False``: every call through a
  connection to it raises ``HypervisorUnavailable``);
* lifecycle events (:meth:`FakeHypervisor.subscribe`): start, destroy, suspend, resume
  and reset emit them, and a test injects failures with :meth:`FakeHost.crash`,
  :meth:`FakeHost.io_error` and :meth:`FakeHost.emit`; ``guest-exec`` answers through a
  record's ``exec_handler`` (a function of argv), or ``GuestAgentUnavailable``.

Backups and checkpoints are not modelled: they raise ``HypervisorUnsupported``. Every
host has its own lock, so simulations may drive many hosts from many threads.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from vmdr.errors import (
    DomainNotFound,
    GuestAgentUnavailable,
    HypervisorError,
    HypervisorUnavailable,
    NetworkNotFound,
)

from ._compat import parse_xml
from .console import console_log
from .domain import DomainInfo, State, parse_disks, parse_nvram, parse_tpm_dir
from .driver import (
    BlockCopyJob,
    Console,
    CopyStatus,
    Domain,
    EventKind,
    GuestExecResult,
    Hypervisor,
    LifecycleEvent,
    NetworkInfo,
    Screenshot,
    Subscription,
)

__all__ = ["FakeDomainRecord", "FakeFleet", "FakeHost", "FakeHypervisor"]

DEFAULT_DISK_SIZE = 1 << 30


@dataclass
class _Copy:
    dest: str
    fmt: str
    bandwidth: int | None
    cur: int
    end: int


@dataclass
class FakeDomainRecord:
    """One domain as the fake host keeps it. Tests may set any field."""

    xml: str  # the live definition (equals the persistent one while stopped)
    inactive_xml: str
    state: State = "stopped"
    persistent: bool = True
    autostart: bool = False
    io_error: bool = False  # paused because a disk failed (error_policy='stop')
    agent: bool = False  # the guest agent answers
    addresses: list[str] = field(default_factory=list)
    screen: Screenshot | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # disk target -> bytes
    copies: dict[str, _Copy] = field(default_factory=dict)
    copy_step: int | None = None
    failing_copies: set[str] = field(default_factory=set)
    # NBD socket -> reads through it before its client is connected (-1: never)
    nbd_unread: dict[str, int] = field(default_factory=dict)
    nbd_reads: int = 0  # nbd_read() calls
    owner: FakeHypervisor | None = None  # a transient domain dies with this connection
    reason: str = ""  # state_reason(): crashed, failed, destroyed, ioerror...
    resets: int = 0  # times reset() was called
    exec_handler: Callable[[list[str]], GuestExecResult] | None = None  # guest-exec
    frozen: int = 0  # frozen_disks() contexts open (overlays taking the writes)

    @property
    def name(self) -> str:
        return parse_xml(self.inactive_xml).findtext("name") or ""

    @property
    def uuid(self) -> str:
        return parse_xml(self.inactive_xml).findtext("uuid") or ""

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")

    def pause_on_io_error(self) -> None:
        """What QEMU does when a disk with error_policy='stop' fails."""
        self.state, self.io_error = "paused", True


def _with_uuid(xml: str) -> str:
    root = parse_xml(xml)
    if root.find("uuid") is None:
        el = ET.Element("uuid")
        el.text = str(uuidlib.uuid4())
        root.insert(1, el)
    return ET.tostring(root, encoding="unicode")


class FakeHost:
    """One simulated host: domains by name, networks by name."""

    def __init__(self, uri: str, fleet: FakeFleet | None = None) -> None:
        self.uri = uri
        self.fleet = fleet  # the fleet it belongs to (migration finds the destination)
        self.up = True
        self.domains: dict[str, FakeDomainRecord] = {}
        self.networks: dict[str, NetworkInfo] = {}
        self.lock = threading.RLock()
        self.subscribers: list[FakeSubscription] = []

    def add_domain(self, xml: str, *, active: bool = False, persistent: bool = True,
                   sizes: dict[str, int] | None = None) -> FakeDomainRecord:
        """Put a domain on the host (a UUID is added when the XML has none)."""
        xml = _with_uuid(xml)
        rec = FakeDomainRecord(xml=xml, inactive_xml=xml, persistent=persistent,
                               state="running" if active else "stopped", sizes=dict(sizes or {}))
        with self.lock:
            self.domains[rec.name] = rec
        return rec

    def emit(self, name: str, kind: EventKind, detail: str = "") -> None:
        """Deliver a lifecycle event of domain ``name`` to every subscriber."""
        rec = self.domains.get(name)
        ev = LifecycleEvent(name, rec.uuid if rec else "", kind, detail)
        for sub in list(self.subscribers):
            sub.deliver(ev)

    def crash(self, name: str, detail: str = "failed") -> None:
        """The QEMU process of ``name`` dies (``failed``) or the guest panics with
        on_crash=destroy (``crashed``): stopped, and the event says so."""
        with self.lock:
            rec = self.domains[name]
            rec.state, rec.reason, rec.io_error, rec.xml = ("stopped", detail, False,
                                                            rec.inactive_xml)
            self.emit(name, "stopped", detail)

    def io_error(self, name: str) -> None:
        """A disk of ``name`` fails (error_policy='stop'): paused, with its event."""
        with self.lock:
            rec = self.domains[name]
            rec.pause_on_io_error()
            rec.reason = "ioerror"
            self.emit(name, "paused", "ioerror")

    def add_network(self, name: str, *, forwards: bool = False,
                    active: bool = True) -> NetworkInfo:
        net = NetworkInfo(name, active, forwards)
        with self.lock:
            self.networks[name] = net
        return net


class FakeFleet:
    """Hosts by URI, e.g. ``fake://host07/system``."""

    def __init__(self) -> None:
        self.hosts: dict[str, FakeHost] = {}
        self._lock = threading.Lock()

    @classmethod
    def simulated(cls, n: int, *, prefix: str = "host") -> FakeFleet:
        """A fleet of ``n`` empty hosts ``fake://<prefix>01/system``..."""
        fleet = cls()
        for i in range(1, n + 1):
            fleet.host(f"fake://{prefix}{i:02d}/system")
        return fleet

    def host(self, uri: str) -> FakeHost:
        """The host at ``uri`` (created on first use)."""
        with self._lock:
            return self.hosts.setdefault(uri, FakeHost(uri, self))

    def connect(self, uri: str) -> FakeHypervisor:
        """A connection (HypervisorUnavailable for an unknown or down host)."""
        host = self.hosts.get(uri)
        if host is None or not host.up:
            raise HypervisorUnavailable(f"cannot connect to {uri}: host unreachable")
        return FakeHypervisor(host)


class FakeHypervisor(Hypervisor):
    """A connection to a :class:`FakeHost`."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.uri = host.uri
        self.local = False
        self.system = self.uri.endswith("/system")
        self._closed = False

    @contextmanager
    def _locked(self) -> Iterator[FakeHost]:
        if self._closed:
            raise HypervisorUnavailable(f"{self.uri}: the connection is closed")
        if not self.host.up:
            raise HypervisorUnavailable(f"{self.uri}: host unreachable")
        with self.host.lock:
            yield self.host

    def _record(self, name: str) -> FakeDomainRecord:
        with self._locked() as h:
            rec = h.domains.get(name)
            if rec is None:
                rec = next((r for r in h.domains.values() if r.uuid == name), None)
            if rec is None:
                raise DomainNotFound(f"domain {name}: no domain with matching name '{name}'")
            return rec

    def close(self) -> None:
        if self._closed:
            return
        with self.host.lock:
            for name, rec in list(self.host.domains.items()):
                if rec.owner is self and not rec.persistent:
                    del self.host.domains[name]  # autodestroy
        self._closed = True

    def list_domains(self) -> list[str]:
        with self._locked() as h:
            return sorted(h.domains)

    def lookup(self, name: str) -> Domain:
        rec = self._record(name)
        return FakeDomain(self, rec.name, rec.uuid)

    def define(self, xml: str) -> str:
        with self._locked() as h:
            xml = _with_uuid(xml)
            name = parse_xml(xml).findtext("name") or ""
            if not name:
                raise HypervisorError("defining domain: the XML has no <name>")
            rec = h.domains.get(name)
            if rec is None:
                h.add_domain(xml)
                return name
            rec.inactive_xml = xml
            rec.persistent = True
            rec.owner = None
            if not rec.active:
                rec.xml = xml
            return name

    def create_transient(self, xml: str) -> Domain:
        with self._locked() as h:
            name = parse_xml(xml).findtext("name") or ""
            if name in h.domains:
                raise HypervisorError(f"starting a transient domain: domain '{name}' "
                                      "already exists")
            rec = h.add_domain(xml, active=True, persistent=False)
            rec.owner = self
            return FakeDomain(self, rec.name, rec.uuid)

    def network(self, name: str) -> NetworkInfo:
        with self._locked() as h:
            net = h.networks.get(name)
        if net is None:
            raise NetworkNotFound(f"network {name}: no network with matching name '{name}'")
        return net

    def subscribe(self, callback: Callable[[LifecycleEvent], None]) -> Subscription:
        with self._locked() as h:
            sub = FakeSubscription(h, callback)
            h.subscribers.append(sub)
            return sub

    def read_nvram(self, info: DomainInfo) -> bytes | None:
        return None  # the fake keeps no files

    def read_tpm_state(self, info: DomainInfo) -> bytes | None:
        return None


class FakeSubscription(Subscription):
    """Events of one fake host; dead once the host goes down (``host.up = False``)."""

    def __init__(self, host: FakeHost, callback: Callable[[LifecycleEvent], None]) -> None:
        self._host = host
        self._callback = callback
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed and self._host.up

    def deliver(self, ev: LifecycleEvent) -> None:
        if self.alive:
            self._callback(ev)

    def close(self) -> None:
        self._closed = True
        with self._host.lock:
            if self in self._host.subscribers:
                self._host.subscribers.remove(self)


class FakeDomain(Domain):
    """A handle: looks its record up on every call (DomainNotFound once it is gone)."""

    def __init__(self, hv: FakeHypervisor, name: str, uuid: str) -> None:
        self._hv = hv
        self._name = name
        self._uuid = uuid

    @property
    def name(self) -> str:
        return self._name

    @property
    def uuid(self) -> str:
        return self._uuid

    @contextmanager
    def _rec(self) -> Iterator[FakeDomainRecord]:
        with self._hv._locked():
            yield self._hv._record(self._uuid)

    def info(self) -> DomainInfo:
        with self._rec() as r:
            live = r.xml if r.active else None
            inactive, state, persistent = r.inactive_xml, r.state, r.persistent
            sizes = dict(r.sizes)
        root = parse_xml(inactive)
        disks = [replace(d, virtual_size=sizes.get(d.target)) for d in
                 parse_disks(live or inactive)]
        return DomainInfo(
            name=self._name, uuid=self._uuid, state=state,
            vcpus=int(root.findtext("vcpu") or 1),
            memory_kib=int(root.findtext("memory") or 0), xml=inactive, disks=disks,
            nvram_path=parse_nvram(inactive),
            tpm_state_dir=parse_tpm_dir(inactive, self._uuid, self._hv.system),
            persistent=persistent, live_xml=live)

    def xml(self, *, inactive: bool = False, secure: bool = False) -> str:
        with self._rec() as r:
            return r.inactive_xml if inactive else r.xml

    def is_active(self) -> bool:
        with self._rec() as r:
            return r.active

    def is_persistent(self) -> bool:
        with self._rec() as r:
            return r.persistent

    def autostart(self) -> bool:
        with self._rec() as r:
            return r.autostart

    def set_autostart(self, on: bool) -> None:
        with self._rec() as r:
            if not r.persistent:
                raise HypervisorError(f"setting the autostart of {self._name}: a transient "
                                      "domain has no autostart")
            r.autostart = on

    def state(self) -> State:
        with self._rec() as r:
            return r.state

    def paused_on_io_error(self) -> bool:
        with self._rec() as r:
            return r.state == "paused" and r.io_error

    def state_reason(self) -> str:
        with self._rec() as r:
            return r.reason

    def reset(self) -> None:
        with self._rec() as r:
            if not r.active:
                raise HypervisorError(f"resetting {self._name}: domain is not running")
            r.resets += 1
            self._hv.host.emit(r.name, "other", "reset")

    def guest_exec(self, argv: Sequence[str], *, timeout: float = 30.0,
                   capture: bool = True) -> GuestExecResult:
        with self._rec() as r:
            handler = r.exec_handler if r.state == "running" and r.agent else None
        if handler is None:
            raise GuestAgentUnavailable(f"guest agent guest-exec: the agent of {self._name} "
                                        "is not connected")
        return handler(list(argv))

    def migrate(self, dest_uri: str, *, migrate_uri: str | None = None,
                unsafe: bool = False) -> None:
        """Move the running domain to the fleet's host at ``dest_uri`` (persistent there,
        undefined here); the guest keeps running, its agent answering."""
        what = f"migrating {self._name} to {dest_uri}"
        src = self._hv.host
        fleet = src.fleet
        dest = fleet.hosts.get(dest_uri) if fleet is not None else None
        if dest is None or not dest.up:
            raise HypervisorError(f"{what}: unable to connect to server: host unreachable")
        if dest is src:
            raise HypervisorError(f"{what}: the destination is this host")
        with self._hv._locked() as h:
            r = self._hv._record(self._uuid)
            if not r.active:
                raise HypervisorError(f"{what}: domain is not running")
            with dest.lock:
                if r.name in dest.domains:
                    raise HypervisorError(f"{what}: domain '{r.name}' already exists")
                del h.domains[r.name]
                r.persistent, r.owner, r.reason = True, None, "migrated"
                dest.domains[r.name] = r
            h.emit(r.name, "stopped", "migrated")
        dest.emit(r.name, "started", "migrated")

    @contextmanager
    def frozen_disks(self, workdir: str) -> Iterator[dict[str, tuple[str, str]]]:  # type: ignore[override]
        with self._rec() as r:
            disks = {d.target: (d.source, d.format or "raw") for d in parse_disks(r.xml)
                     if d.device == "disk" and d.source and d.type == "file"}
            r.frozen += 1
        try:
            yield disks
        finally:
            with self._rec() as r:
                r.frozen -= 1

    def merge_frozen(self, workdir: str,
                     originals: dict[str, tuple[str, str]] | None = None) -> list[str]:
        """A frozen_disks() context never closed (its process died) is merged back."""
        with self._rec() as r:
            if r.frozen <= 0:
                return []
            targets = [d.target for d in parse_disks(r.xml)
                       if d.device == "disk" and d.source and d.type == "file"]
            r.frozen = 0
        return [f"merged leftover overlay of {t}" for t in targets]

    def start(self) -> None:
        with self._rec() as r:
            if r.active:
                raise HypervisorError(f"starting {self._name}: domain is already running")
            r.state, r.xml, r.reason = "running", r.inactive_xml, "booted"
            self._hv.host.emit(r.name, "started", "booted")

    def destroy(self) -> None:
        with self._hv._locked() as h:
            try:
                r = self._hv._record(self._uuid)
            except DomainNotFound:
                return  # a transient domain that is gone already
            was_active = r.active
            r.state, r.io_error, r.reason = "stopped", False, "destroyed"
            r.copies.clear()
            if was_active:
                h.emit(r.name, "stopped", "destroyed")
            if not r.persistent:
                h.domains.pop(r.name, None)
            else:
                r.xml = r.inactive_xml

    def undefine(self) -> None:
        with self._hv._locked() as h:
            r = self._hv._record(self._uuid)
            if r.active:
                r.persistent = False  # gone when it stops, like libvirt
            else:
                h.domains.pop(r.name, None)

    def suspend(self) -> None:
        with self._rec() as r:
            if r.state == "running":
                r.state, r.reason = "paused", "user"
                self._hv.host.emit(r.name, "paused", "paused")

    def resume(self) -> None:
        with self._rec() as r:
            if r.state != "paused":
                raise HypervisorError(f"resuming {self._name}: domain is not paused")
            r.state, r.io_error, r.reason = "running", False, "unpaused"
            self._hv.host.emit(r.name, "resumed", "unpaused")

    def block_copy(self, disk: str, dest: str, *, fmt: str = "qcow2",
                   bandwidth: int | None = None) -> BlockCopyJob:
        with self._rec() as r:
            what = f"copying disk {disk} to {dest}"
            if not r.active:
                raise HypervisorError(f"{what}: domain is not running")
            if disk not in {d.target for d in parse_disks(r.xml)}:
                raise HypervisorError(f"{what}: invalid argument: disk {disk} not found")
            if disk in r.copies:
                raise HypervisorError(f"{what}: block copy still active: disk '{disk}' "
                                      "already in active block job")
            r.copies[disk] = _Copy(dest, fmt, bandwidth, 0,
                                   r.sizes.get(disk, DEFAULT_DISK_SIZE))
        return FakeBlockCopyJob(self, disk)

    def block_job(self, disk: str) -> BlockCopyJob:
        return FakeBlockCopyJob(self, disk)

    def mirror_to_nbd(self, disk: str, socket: str, export: str, *,
                      synchronous: bool = False, bandwidth: int = 0) -> BlockCopyJob:
        return self.block_copy(disk, f"nbd+unix:///{export}?socket={socket}", fmt="raw",
                               bandwidth=bandwidth or None)

    def nbd_read(self, socket: str) -> bool:
        with self._rec() as r:
            if not r.active:
                raise HypervisorError(f"reading through an NBD node of {self._name}: "
                                      "domain is not running")
            if not any(h.get("socket") == socket for h in parse_xml(r.xml).iter("host")):
                return False
            r.nbd_reads += 1
            if r.nbd_unread.get(socket, 0) > 0:
                r.nbd_unread[socket] -= 1
            return True

    def guest_ping(self, timeout: int = 3) -> bool:
        with self._rec() as r:
            return r.state == "running" and r.agent

    def guest_addresses(self) -> list[str]:
        with self._rec() as r:
            return list(r.addresses) if r.active else []

    def console(self) -> Console:
        return FakeConsole(self, console_log(self.xml()))


class FakeBlockCopyJob(BlockCopyJob):
    def __init__(self, dom: FakeDomain, disk: str) -> None:
        super().__init__(disk)
        self._dom = dom

    def status(self) -> CopyStatus:
        with self._dom._rec() as r:
            c = r.copies.get(self.disk)
            if c is None:
                return CopyStatus(self.disk, 0, 0, False)
            if self.disk in r.failing_copies:
                del r.copies[self.disk]
                return CopyStatus(self.disk, 0, 0, False)
            c.cur = c.end if r.copy_step is None else min(c.end, c.cur + r.copy_step)
            return CopyStatus(self.disk, c.cur, c.end, True, c.bandwidth or 0)

    def set_speed(self, bandwidth: int) -> None:
        with self._dom._rec() as r:
            c = r.copies.get(self.disk)
            if c is None:
                raise HypervisorError(f"setting the speed of the block job of {self.disk}: "
                                      "no block job on it")
            c.bandwidth = bandwidth or None

    def pivot(self) -> bool:
        with self._dom._rec() as r:
            c = r.copies.get(self.disk)
            if c is None:
                raise HypervisorError(f"pivoting disk {self.disk}: no block job on it")
            if c.cur < c.end:
                return False
            r.xml = _repoint(r.xml, self.disk, c.dest, c.fmt)
            r.inactive_xml = _repoint(r.inactive_xml, self.disk, c.dest, c.fmt)
            del r.copies[self.disk]
            return True

    def cancel(self) -> None:
        with self._dom._rec() as r:
            r.copies.pop(self.disk, None)


def _repoint(xml: str, disk: str, dest: str, fmt: str) -> str:
    """``xml`` with ``disk`` on the local file ``dest`` (no backing chain)."""
    root = parse_xml(xml)
    for el in root.findall("./devices/disk"):
        tgt = el.find("target")
        if tgt is None or tgt.get("dev") != disk:
            continue
        el.set("type", "file")
        for child in el.findall("source") + el.findall("backingStore"):
            el.remove(child)
        el.insert(0, ET.Element("source", file=dest))
        driver = el.find("driver")
        if driver is None:
            driver = ET.SubElement(el, "driver", name="qemu")
        driver.set("type", fmt)
    return ET.tostring(root, encoding="unicode")


class FakeConsole(Console):
    def __init__(self, dom: FakeDomain, log_path: str | None) -> None:
        super().__init__(log_path)
        self._dom = dom

    def screenshot(self) -> Screenshot:
        with self._dom._rec() as r:
            if not r.active:
                raise HypervisorError(f"taking a screenshot: {self._dom.name} is not running")
            if r.screen is None:
                raise HypervisorError(f"taking a screenshot: {self._dom.name} has no display")
            return r.screen
