"""The hypervisor driver interface: what vmdr asks of a host, and the handles it hands out.

Two drivers implement it: :class:`~vmdr.hypervisor.connection.LibvirtHypervisor` (libvirt
and QEMU, local or over ssh; :func:`vmdr.hypervisor.connect`) and
:class:`~vmdr.hypervisor.fake.FakeHypervisor` (in memory, for unit tests and simulated
fleets). ``tests/unit/test_hypervisor_contract.py`` runs one contract suite against both.

Everything a driver raises is a :mod:`vmdr.errors` exception (``DomainNotFound``,
``NetworkNotFound``, ``HypervisorUnavailable``, ``HypervisorUnsupported``,
``HypervisorError``...): no library error and no library object crosses this interface.

The surface::

    Hypervisor   uri, local, system; close(); list_domains(); lookup(name|uuid) -> Domain;
                 domain(name) -> DomainInfo; define(xml); start/destroy/undefine(name);
                 wait_heartbeat(name, ...); network(name) -> NetworkInfo;
                 create_transient(xml) -> Domain; start_sandbox(xml, network) -> Sandbox;
                 subscribe(callback) -> Subscription (lifecycle events; optional);
                 backup side (optional: HypervisorUnsupported by default): backup(...),
                 list/checkpoint_xml/redefine/delete_checkpoint, cleanup_leftovers,
                 read_nvram, read_tpm_state
    Domain       name, uuid; info(); xml(inactive, secure); is_active(); is_persistent();
                 state(); paused_on_io_error(); start(); destroy(); undefine(); suspend();
                 resume(); block_copy(disk, dest) -> BlockCopyJob; block_job(disk);
                 guest_ping(); guest_addresses(); console() -> Console;
                 resume_after_io_error(); wait_heartbeat(...);
                 optional (HypervisorUnsupported by default): state_reason(); reset(); migrate();
                 frozen_disks(workdir) (a context manager);
                 guest_exec(argv, ...) -> GuestExecResult; mirror_to_nbd(disk, socket,
                 export, synchronous=) -> BlockCopyJob
    Subscription close() (also a context manager); hands LifecycleEvent to its callback
    BlockCopyJob disk; status() -> CopyStatus; pivot() -> bool; cancel()
    BackupJob    method, consistency, checkpoint, checkpoint_xml, disks (DiskSource),
                 skipped, warnings; commit() (a context manager)
    Console      log_path; read_log(); screenshot() -> Screenshot
    Sandbox      domain, network; close() (also a context manager)

Handles hold no state worth keeping: look a domain up again rather than caching one across
a long wait (a handle whose domain went away raises ``DomainNotFound``).
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Literal, Protocol

from vmdr.errors import HeartbeatTimeout, HypervisorError, HypervisorUnsupported, UsageError

from .domain import DiskInfo, DomainInfo, State
from .session import DiskSource, Method

__all__ = ["BackupJob", "BlockCopyJob", "Console", "CopyStatus", "Domain", "EventKind",
           "GuestExecResult", "Hypervisor", "LifecycleEvent", "NetworkInfo", "Sandbox",
           "Screenshot", "Subscription"]


@dataclass(frozen=True)
class CopyStatus:
    """One disk's block-copy job: bytes copied of the bytes to copy."""

    disk: str
    cur: int
    end: int
    active: bool
    bandwidth: int = 0  # the job's cap in bytes/s (0: none)

    @property
    def ready(self) -> bool:
        """The copy is in sync: a pivot will succeed."""
        return self.active and self.end > 0 and self.cur == self.end


@dataclass(frozen=True)
class Screenshot:
    """The domain's screen as the hypervisor hands it out (``image/x-portable-pixmap`` from
    QEMU before 7.1, PNG after)."""

    mime: str
    data: bytes


EventKind = Literal["defined", "undefined", "started", "paused", "resumed", "stopped",
                   "shutdown", "pmsuspended", "crashed", "other"]


@dataclass(frozen=True)
class LifecycleEvent:
    """A domain changed state, as the hypervisor reported it (libvirt's lifecycle event).

    ``detail`` is the hypervisor's reason in lower case: for ``stopped`` one of shutdown,
    destroyed, crashed, migrated, saved, failed (the QEMU process died); for ``paused``
    paused, migrated, ioerror, watchdog, api-error...; for ``crashed`` panicked."""

    domain: str  # name
    uuid: str
    kind: EventKind
    detail: str = ""

    @property
    def unexpected(self) -> bool:
        """Nobody asked for it: a crash, a QEMU process that died, a pause on an I/O error
        or by the emulated watchdog device."""
        if self.kind == "crashed":
            return True
        if self.kind == "stopped":
            return self.detail in ("crashed", "failed")
        if self.kind == "paused":
            return self.detail in ("ioerror", "watchdog", "api-error")
        return False


class Subscription(ABC):
    """Lifecycle events flowing to a callback until :meth:`close`. The callback runs on the
    driver's event thread: it must return quickly (hand the event to a queue)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the events; no error if already closed."""

    @property
    def alive(self) -> bool:
        """Events still flow (False once the connection behind it was lost: resubscribe)."""
        return True

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class GuestExecResult:
    """A command run in the guest through its agent (``guest-exec``). ``exitcode`` is None
    when it was still running at the timeout (it keeps running in the guest)."""

    pid: int
    exitcode: int | None
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exitcode == 0


@dataclass(frozen=True)
class NetworkInfo:
    """A virtual network of the host."""

    name: str
    active: bool
    forwards: bool  # has a <forward>: guests on it reach beyond the host

    @property
    def isolated(self) -> bool:
        return not self.forwards


class BlockCopyJob(ABC):
    """A full (flattening) copy of one disk of a running domain to a new local image.

    Created by :meth:`Domain.block_copy`, found again by :meth:`Domain.block_job`."""

    def __init__(self, disk: str) -> None:
        self.disk = disk

    @abstractmethod
    def status(self) -> CopyStatus:
        """Progress; ``active=False`` when no job runs on the disk (never started, pivoted,
        cancelled, or failed)."""

    @abstractmethod
    def pivot(self) -> bool:
        """Switch the disk onto its copy (live and persistent definition); False if the
        copy is not in sync yet (try again later)."""

    @abstractmethod
    def cancel(self) -> None:
        """Abandon the copy; the domain stays on its current disk. No error if none runs."""

    def set_speed(self, bandwidth: int) -> None:
        """Cap the running job at *bandwidth* bytes/s (0: no cap)."""
        raise HypervisorUnsupported(f"changing the speed of the block job of {self.disk} "
                                    f"is not supported by {type(self).__name__}")


class Console(ABC):
    """A domain's serial console log and its screen."""

    def __init__(self, log_path: str | None) -> None:
        self.log_path = log_path

    def read_log(self) -> str:
        """The console log so far ('' if there is none yet)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @abstractmethod
    def screenshot(self) -> Screenshot:
        """The screen now (HypervisorError if the domain has no display or is off)."""


class Domain(ABC):
    """One domain (virtual machine) of a host."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def uuid(self) -> str: ...

    @abstractmethod
    def info(self) -> DomainInfo:
        """Inspect the domain: state, vCPUs, memory, disks with sizes, NVRAM and TPM."""

    @abstractmethod
    def xml(self, *, inactive: bool = False, secure: bool = False) -> str:
        """The live definition, or (``inactive``) the persistent one; ``secure`` includes
        passwords (never log it)."""

    @abstractmethod
    def is_active(self) -> bool:
        """A QEMU process exists (running or paused)."""

    @abstractmethod
    def is_persistent(self) -> bool:
        """Defined (False: transient, gone when it stops)."""

    @abstractmethod
    def autostart(self) -> bool:
        """libvirt starts it when its host (libvirtd) starts."""

    @abstractmethod
    def set_autostart(self, on: bool) -> None:
        """Turn libvirt's autostart of a defined domain on or off."""

    @abstractmethod
    def state(self) -> State:
        """running | paused | stopped | other."""

    @abstractmethod
    def paused_on_io_error(self) -> bool:
        """Paused because a disk returned an I/O error (error_policy='stop')."""

    @abstractmethod
    def start(self) -> None:
        """Boot a defined domain."""

    @abstractmethod
    def destroy(self) -> None:
        """Power off hard; no error if it is not running. A transient domain is gone after."""

    @abstractmethod
    def undefine(self) -> None:
        """Remove the definition with its NVRAM and checkpoint/snapshot metadata."""

    @abstractmethod
    def suspend(self) -> None:
        """Pause a running domain; no error if it is already paused or off."""

    @abstractmethod
    def resume(self) -> None:
        """Continue a paused domain."""

    @abstractmethod
    def block_copy(self, disk: str, dest: str, *, fmt: str = "qcow2",
                   bandwidth: int | None = None) -> BlockCopyJob:
        """Start a full copy of ``disk`` into a new file ``dest`` (created by the
        hypervisor); ``bandwidth`` in bytes/s, None: unlimited."""

    @abstractmethod
    def block_job(self, disk: str) -> BlockCopyJob:
        """The copy job of ``disk`` (its ``status().active`` says whether one runs)."""

    def mirror_to_nbd(self, disk: str, socket: str, export: str, *,
                      synchronous: bool = False, bandwidth: int = 0) -> BlockCopyJob:
        """Start a continuous mirror of ``disk`` into the raw NBD export ``export`` served
        on the unix ``socket`` (an existing disk of the same size: a full copy, then every
        guest write). ``synchronous``: a guest write completes only once it reached the
        export too (``VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES``, RPO 0). ``bandwidth``:
        the job's cap in bytes/s (0: none; :meth:`BlockCopyJob.set_speed` changes it).
        Never pivoted: the domain stays on its own disk; cancel() ends the mirror."""
        raise HypervisorUnsupported(f"{self.name}: this driver cannot mirror a disk")

    def nbd_read(self, socket: str) -> bool:
        """Make QEMU read a block through the NBD client that connects to the unix
        ``socket`` (a disk's backing), to move its reconnect on: QEMU's client notices a
        lost server, starts reconnecting and takes the new connection only on requests.
        False if no such client exists (the disk moved off the export). The read's
        outcome is not known here: ask the server whether the client is connected."""
        raise HypervisorUnsupported(f"{self.name}: this driver cannot read an NBD backing")

    @abstractmethod
    def guest_ping(self, timeout: int = 3) -> bool:
        """The guest agent answers within ``timeout`` seconds."""

    @abstractmethod
    def guest_addresses(self) -> list[str]:
        """The guest's IPv4 addresses (guest agent first, then DHCP leases; no loopback);
        [] when none is known."""

    @abstractmethod
    def console(self) -> Console:
        """The serial console log and screen."""

    # -- optional: HypervisorUnsupported unless a driver offers it ---------------------------

    def state_reason(self) -> str:
        """Why the domain is in its state, in lower case: for a stopped domain shutdown,
        destroyed, crashed, failed...; for a paused one ioerror, user...; '' if unknown."""
        return ""

    def shutdown(self) -> None:
        """Ask the guest to power off cleanly (guest agent, else the ACPI power button);
        returns at once: wait for ``is_active()`` to turn false."""
        raise HypervisorUnsupported(f"shutting {self.name} down is not supported by "
                                    f"the {type(self).__name__} driver")

    def reset(self) -> None:
        """Hard-reset the guest (the reset button: no shutdown, the QEMU process stays)."""
        raise HypervisorUnsupported(f"resetting {self.name} is not supported by "
                                    f"the {type(self).__name__} driver")

    def guest_exec(self, argv: Sequence[str], *, timeout: float = 30.0,
                   capture: bool = True) -> GuestExecResult:
        """Run ``argv`` in the guest through its agent and wait up to ``timeout`` seconds
        for it to exit (GuestAgentUnavailable when the agent does not answer)."""
        raise HypervisorUnsupported(f"guest-exec is not supported by "
                                    f"the {type(self).__name__} driver")

    def migrate(self, dest_uri: str, *, migrate_uri: str | None = None,
                unsafe: bool = False) -> None:
        """Live-migrate this running domain to the host at ``dest_uri``, peer to peer (this
        host's libvirtd connects to ``dest_uri``, so give the URI *this host* reaches the
        destination by, e.g. ``qemu+tcp://10.0.0.12/system``). The domain becomes
        persistent there and is undefined here (``VIR_MIGRATE_LIVE | PEER2PEER |
        PERSIST_DEST | UNDEFINE_SOURCE``). ``migrate_uri`` is where QEMU sends the memory
        (``tcp://ADDRESS[:PORT]``; default: libvirt's choice from the destination's host
        name). ``unsafe``: allow disks without ``cache='none'`` (a plain shared
        directory)."""
        raise HypervisorUnsupported(f"migrating {self.name} is not supported by "
                                    f"the {type(self).__name__} driver")

    def frozen_disks(self, workdir: str) -> AbstractContextManager[dict[str, tuple[str, str]]]:
        """Hold the images of the file disks still while the guest keeps running: a
        temporary external overlay per disk in ``workdir`` (which the domain's host must
        reach) takes the writes. Yields disk target -> (frozen image path, format); on exit
        the overlays are merged back (active blockcommit + pivot) and deleted. A stopped
        domain's images are yielded as they are."""
        return self._frozen_as_is()

    def merge_frozen(self, workdir: str,
                     originals: dict[str, tuple[str, str]] | None = None) -> list[str]:
        """Undo a :meth:`frozen_disks` whose process died (vmdr killed): every disk running
        or defined on one of its overlays in ``workdir`` is merged back (active blockcommit
        + pivot, or ``qemu-img commit`` when stopped), pointed back at its own image
        (``originals``: target -> (path, format), else the overlay's backing file) and the
        overlay deleted. What was done; empty when nothing was left."""
        return []  # this driver never freezes a running domain

    @contextmanager
    def _frozen_as_is(self) -> Iterator[dict[str, tuple[str, str]]]:
        info = self.info()
        if info.running:
            raise HypervisorUnsupported(f"freezing the disks of a running {self.name} is "
                                        f"not supported by the {type(self).__name__} driver")
        yield {d.target: (d.source, d.format or "raw") for d in info.disks
               if d.device == "disk" and d.source and d.type == "file"}

    # -- composed from the above ---------------------------------------------------------------

    def resume_after_io_error(self, *, attempts: int = 10, settle: float = 1.0,
                              sleep: Callable[[float], None] = time.sleep) -> None:
        """Resume a paused domain and make sure it stays running (retrying the failed I/O).

        QEMU's NBD client reconnects in the background after the first retried request
        fails, so the guest may pause again once; resume until it stays up for ``settle``
        seconds."""
        for _ in range(attempts):
            if self.state() == "paused":
                self.resume()
            sleep(settle)
            if self.state() != "paused":
                return
        raise HypervisorError(f"{self.name} pauses again on I/O errors: its disks' backing "
                              "is still unreachable")

    def wait_heartbeat(
        self, *, agent: bool = True, console_pattern: str | None = None,
        console_log: str | None = None, timeout: float = 300.0, poll: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> float:
        """Seconds until the guest agent answers or ``console_pattern`` shows in
        ``console_log`` (HeartbeatTimeout; HypervisorError if the domain stops)."""
        if not agent and not (console_pattern and console_log):
            raise ValueError("wait_heartbeat needs agent or console_pattern + console_log")
        pattern = re.compile(console_pattern) if console_pattern else None
        t0 = clock()
        while True:
            if not self.is_active():
                raise HypervisorError(f"{self.name} stopped before its heartbeat")
            if pattern is not None and console_log and _log_matches(console_log, pattern):
                return clock() - t0
            if agent and self.guest_ping(timeout=max(1, int(min(poll * 2, 5)))):
                return clock() - t0
            if clock() - t0 > timeout:
                raise HeartbeatTimeout(f"{self.name}: no heartbeat within {timeout:.0f}s")
            sleep(poll)


def _log_matches(path: str, pattern: re.Pattern[str]) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return pattern.search(f.read()) is not None
    except FileNotFoundError:
        return False


class Sandbox:
    """A transient domain that the hypervisor destroys when the connection closes (even if
    vmdr is killed), optionally with one NIC on an isolated network. Close it when done."""

    def __init__(self, domain: Domain, network: NetworkInfo | None) -> None:
        self.domain = domain
        self.network = network

    def close(self) -> None:
        """Destroy the domain (and undefine it, if someone made it persistent); no error if
        it is gone already."""
        try:
            self.domain.destroy()
            if self.domain.is_persistent():
                self.domain.undefine()
        except HypervisorError:
            pass  # gone already; else the hypervisor destroys it when the connection closes

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class BackupJob(Protocol):
    """What :meth:`Hypervisor.backup` hands out: a context manager around one backup of one
    domain (the libvirt driver's is :class:`~vmdr.hypervisor.backup.BackupSession`).

    Leaving it without :meth:`commit` undoes everything the backup put in place."""

    @property
    def method(self) -> str:
        """checkpoint | overlay | offline."""

    @property
    def consistency(self) -> Literal["quiesced", "crash"]: ...

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint this backup creates (the next incremental's base), or None."""

    @property
    def checkpoint_xml(self) -> str | None:
        """Its full XML, to save with the snapshot (see ``redefine_checkpoint``)."""

    @property
    def disks(self) -> list[DiskSource]:
        """The disks to read: extents and thread-safe reads."""

    @property
    def skipped(self) -> list[DiskInfo]: ...

    @property
    def warnings(self) -> list[str]: ...

    def commit(self) -> None:
        """The data is safely stored: keep the new checkpoint, drop older ones."""

    def __enter__(self) -> BackupJob: ...

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class Hypervisor(ABC):
    """One connection to one host. Every error leaves as a :mod:`vmdr.errors` exception."""

    uri: str
    local: bool  # the host is this machine (files and sockets are reachable directly)
    system: bool  # a system instance (guests run as the QEMU user, not as us)

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Close the connection; transient domains created through it are destroyed."""

    @abstractmethod
    def list_domains(self) -> list[str]:
        """Names of all domains, running or not, sorted."""

    @abstractmethod
    def lookup(self, name: str) -> Domain:
        """The domain with this name or UUID (DomainNotFound)."""

    @abstractmethod
    def define(self, xml: str) -> str:
        """Define (persist) a domain, or update the definition of one with that name; its
        name."""

    @abstractmethod
    def create_transient(self, xml: str) -> Domain:
        """Create and start a transient domain destroyed when this connection closes."""

    @abstractmethod
    def network(self, name: str) -> NetworkInfo:
        """A virtual network (NetworkNotFound)."""

    # -- composed from the above ---------------------------------------------------------------

    def domain(self, name: str) -> DomainInfo:
        """Inspect a domain (DomainNotFound if there is none)."""
        return self.lookup(name).info()

    def start(self, name: str) -> None:
        self.lookup(name).start()

    def destroy(self, name: str) -> None:
        """Power a domain off (no error if already off)."""
        self.lookup(name).destroy()

    def undefine(self, name: str) -> None:
        self.lookup(name).undefine()

    def wait_heartbeat(self, name: str, *, agent: bool = True,
                       console_pattern: str | None = None, console_log: str | None = None,
                       timeout: float = 300.0) -> float:
        """Seconds until the guest shows life (agent ping or console regex)."""
        return self.lookup(name).wait_heartbeat(agent=agent, console_pattern=console_pattern,
                                                console_log=console_log, timeout=timeout)

    def isolated_network(self, name: str) -> NetworkInfo:
        """The network, if it is active and forwards nothing (else UsageError)."""
        net = self.network(name)
        if net.forwards:
            raise UsageError(f"network {name!r} forwards traffic; a sandbox needs an isolated "
                             "network (no <forward>)")
        if not net.active:
            raise UsageError(f"network {name!r} is not active")
        return net

    def start_sandbox(self, xml: str, *, network: str | None = None) -> Sandbox:
        """Start ``xml`` as a transient, auto-destroyed domain. With ``network``, that
        network must be isolated and active (UsageError), and the XML's NIC should use it."""
        net = self.isolated_network(network) if network else None
        return Sandbox(self.create_transient(xml), net)

    def subscribe(self, callback: Callable[[LifecycleEvent], None]) -> Subscription:
        """Deliver every domain lifecycle event of this host to ``callback`` (on the driver's
        event thread) until the subscription is closed."""
        raise self._unsupported("lifecycle events")

    def create_network(self, xml: str) -> NetworkInfo:
        """Start a transient virtual network from ``xml`` (gone when destroyed or when the
        host restarts)."""
        raise self._unsupported("creating networks")

    def destroy_network(self, name: str) -> None:
        """Stop (and, if persistent, undefine) a network; no error if there is none."""
        raise self._unsupported("removing networks")

    def free_memory(self) -> int | None:
        """Bytes of host memory free now (None when the driver cannot tell)."""
        return None

    def qemu_identity(self) -> tuple[int, int] | None:
        """The ``(uid, gid)`` this host's QEMU processes run as (libvirt's DAC base label),
        or None when the driver cannot tell (then QEMU runs as the connecting user)."""
        return None

    # -- backup side: optional, HypervisorUnsupported unless a driver offers it ---------------

    def _unsupported(self, what: str) -> HypervisorUnsupported:
        return HypervisorUnsupported(f"{what} is not supported by the {type(self).__name__} "
                                     f"driver ({self.uri})")

    def backup(self, info: DomainInfo, *, checkpoint_prefix: str, scratch_dir: str,
               disks: Sequence[str] | None = None, incremental_from: str | None = None,
               quiesce: bool = False, method: Method = "auto",
               now: datetime | None = None) -> BackupJob:
        """A backup session (a context manager); see the package docstring."""
        raise self._unsupported("backup")

    def list_checkpoints(self, info: DomainInfo, prefix: str) -> list[str]:
        """This prefix's checkpoint names, oldest first."""
        raise self._unsupported("checkpoints")

    def checkpoint_xml(self, info: DomainInfo, name: str) -> str:
        """A checkpoint's full XML (what :meth:`redefine_checkpoint` takes)."""
        raise self._unsupported("checkpoints")

    def redefine_checkpoint(self, info: DomainInfo, saved_checkpoint_xml: str) -> str:
        """Recreate lost checkpoint metadata; validated against the bitmaps when running."""
        raise self._unsupported("checkpoints")

    def delete_checkpoint(self, info: DomainInfo, name: str) -> bool:
        """Delete one checkpoint; False if it did not exist."""
        raise self._unsupported("checkpoints")

    def cleanup_leftovers(self, name: str, checkpoint_prefix: str, scratch_dir: str) -> list[str]:
        """Undo an interrupted backup of ``name``; what was done."""
        raise self._unsupported("backup")

    def read_nvram(self, info: DomainInfo) -> bytes | None:
        """The UEFI NVRAM file's bytes, or None if the domain has none."""
        raise self._unsupported("reading NVRAM")

    def read_tpm_state(self, info: DomainInfo) -> bytes | None:
        """The swtpm state directory as an uncompressed tar, or None if there is none."""
        raise self._unsupported("reading TPM state")
