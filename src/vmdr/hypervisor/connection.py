"""The libvirt driver: :func:`connect` opens a connection, :class:`LibvirtHypervisor`
implements :class:`~vmdr.hypervisor.driver.Hypervisor` on it. The connection and its
``virDomain`` objects stay private to this package."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlparse

from vmdr.errors import HypervisorError, UsageError

from . import checkpoints, cleanup, state
from ._compat import lv, parse_xml
from .backup import BackupOptions, BackupSession, Method
from .domain import DomainInfo
from .driver import Domain, Hypervisor, LifecycleEvent, NetworkInfo, Subscription
from .errors import libvirt_errors
from .events import LibvirtSubscription
from .handles import LibvirtDomain
from .hostfiles import HostFiles, LocalFiles, RemoteFiles
from .remote import is_local_uri, parse_ssh_uri
from .xml import dac_identity

DEFAULT_URI = "qemu:///system"
T = TypeVar("T")


def _silence(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


__all__ = ["DEFAULT_URI", "LibvirtHypervisor", "cleanup_leftovers", "connect", "is_local_uri"]


def connect(uri: str | None = None, *, readonly: bool = False) -> Hypervisor:
    """Open ``uri`` (default qemu:///system; qemu+ssh://host/system works too)."""
    m = lv()
    uri = uri or DEFAULT_URI
    m.registerErrorHandler(_silence, None)
    with libvirt_errors(f"cannot connect to {uri}", opening=True):
        conn = m.openReadOnly(uri) if readonly else m.open(uri)
    if conn is None:
        raise HypervisorError(f"cannot connect to {uri}")
    return LibvirtHypervisor(conn, uri)


class LibvirtHypervisor(Hypervisor):
    """One libvirt connection; every libvirt error leaves as a vmdr error."""

    def __init__(self, conn: Any, uri: str) -> None:
        self._conn = conn
        self.uri = uri
        self.local = is_local_uri(uri)
        self.system = urlparse(uri).path.rstrip("/") == "/system"

    def close(self) -> None:
        """Close the connection (libvirt destroys the transient domains it started)."""
        try:
            self._conn.close()
        except lv().libvirtError:
            pass  # closing a dead connection: nothing left to release

    # -- inspection --------------------------------------------------------------------------

    def _lookup(self, name: str) -> Any:
        """The raw virDomain for a name or UUID (DomainNotFound)."""
        with libvirt_errors(f"domain {name}"):
            if len(name) == 36 and name.count("-") == 4:
                try:
                    return self._conn.lookupByUUIDString(name)
                except lv().libvirtError:
                    pass  # not a UUID of a domain: maybe a name that looks like one
            return self._conn.lookupByName(name)

    def lookup(self, name: str) -> Domain:
        return LibvirtDomain(self._lookup(name), system=self.system)

    def list_domains(self) -> list[str]:
        with libvirt_errors("listing domains"):
            return sorted(str(d.name()) for d in self._conn.listAllDomains(0))

    def define(self, xml: str) -> str:
        with libvirt_errors("defining domain"):
            return str(self._conn.defineXML(xml).name())

    def create_transient(self, xml: str) -> Domain:
        with libvirt_errors("starting a transient domain"):
            dom = self._conn.createXML(xml, lv().VIR_DOMAIN_START_AUTODESTROY)
        return LibvirtDomain(dom, system=self.system)

    def network(self, name: str) -> NetworkInfo:
        with libvirt_errors(f"network {name}"):
            net = self._conn.networkLookupByName(name)
            xml = str(net.XMLDesc(0))
            active = bool(net.isActive())
        return NetworkInfo(name, active, parse_xml(xml).find("forward") is not None)

    def create_network(self, xml: str) -> NetworkInfo:
        with libvirt_errors("creating a network"):
            net = self._conn.networkCreateXML(xml)
            name = str(net.name())
        return self.network(name)

    def destroy_network(self, name: str) -> None:
        m = lv()
        try:
            net = self._conn.networkLookupByName(name)
        except m.libvirtError:
            return
        with libvirt_errors(f"removing network {name}"):
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()

    def free_memory(self) -> int | None:
        with libvirt_errors("reading the host's free memory"):
            return int(self._conn.getFreeMemory())

    def qemu_identity(self) -> tuple[int, int] | None:
        with libvirt_errors("reading the host's capabilities"):
            caps = str(self._conn.getCapabilities())
        return dac_identity(caps)

    def subscribe(self, callback: Callable[[LifecycleEvent], None]) -> Subscription:
        """Lifecycle events of every domain, on a connection of their own (see
        :mod:`.events`)."""
        return LibvirtSubscription(self.uri, callback)

    def read_nvram(self, info: DomainInfo) -> bytes | None:
        """The UEFI NVRAM file's bytes, or None if the domain has none (ssh ``cat`` for
        a qemu+ssh:// host)."""
        path = info.nvram_path
        if path is None:
            return None
        return self._with_files("reading NVRAM", lambda fs: fs.read_file(path))

    def read_tpm_state(self, info: DomainInfo) -> bytes | None:
        """The swtpm state directory as an uncompressed tar, or None if there is none
        (ssh ``tar`` for a qemu+ssh:// host)."""
        path = info.tpm_state_dir
        if path is None:
            return None
        return self._with_files("reading TPM state", lambda fs: fs.read_tree(path))

    def files(self, what: str = "backup") -> HostFiles:
        """The hypervisor host's files: this machine, or the ssh host of a qemu+ssh:// URI
        (UsageError for other remote transports). Not opened yet."""
        if self.local:
            return LocalFiles()
        try:
            return RemoteFiles(parse_ssh_uri(self.uri))
        except UsageError as exc:
            raise UsageError(f"{what}: {exc.message}") from None

    def _with_files(self, what: str, fn: Callable[[HostFiles], T]) -> T:
        fs = self.files(what).open()
        try:
            return fn(fs)
        finally:
            fs.close()

    # -- backup ------------------------------------------------------------------------------

    def backup(
        self,
        info: DomainInfo,
        *,
        checkpoint_prefix: str,
        scratch_dir: str,
        disks: Sequence[str] | None = None,
        incremental_from: str | None = None,
        quiesce: bool = False,
        method: Method = "auto",
        now: datetime | None = None,
    ) -> BackupSession:
        """A backup session (a context manager); see the package docstring."""
        files = self.files("backup")
        user = None
        if self.system:  # the remote host looks up its own QEMU account
            user = state.qemu_user() if self.local else "auto"
        opts = BackupOptions(
            checkpoint_prefix=checkpoint_prefix, scratch_dir=scratch_dir, disks=disks,
            incremental_from=incremental_from, quiesce=quiesce, method=method, now=now,
            qemu_user=user)
        return BackupSession(self._lookup(info.uuid), info, opts, local=self.local, files=files)

    def list_checkpoints(self, info: DomainInfo, prefix: str) -> list[str]:
        """This prefix's checkpoint names, oldest first."""
        return checkpoints.list_ours(self._lookup(info.uuid), prefix)

    def checkpoint_xml(self, info: DomainInfo, name: str) -> str:
        """A checkpoint's full XML (what :meth:`redefine_checkpoint` takes)."""
        return checkpoints.full_xml(self._lookup(info.uuid), name)

    def redefine_checkpoint(self, info: DomainInfo, saved_checkpoint_xml: str) -> str:
        """Recreate lost checkpoint metadata; validated against the bitmaps when running."""
        dom = self._lookup(info.uuid)
        with libvirt_errors("checking domain"):
            running = bool(dom.isActive())
        return checkpoints.redefine(dom, saved_checkpoint_xml, validate=running)

    def delete_checkpoint(self, info: DomainInfo, name: str) -> bool:
        """Delete one checkpoint; False if it did not exist."""
        with libvirt_errors(f"deleting checkpoint {name}"):
            return checkpoints.delete(self._lookup(info.uuid), name)

    def cleanup_leftovers(self, name: str, checkpoint_prefix: str, scratch_dir: str) -> list[str]:
        """Undo an interrupted backup of ``name`` (see :mod:`.cleanup`); what was done."""
        dom = self._lookup(name)
        return self._with_files("backup", lambda fs: cleanup.cleanup_domain(
            dom, checkpoint_prefix, scratch_dir, fs))


def cleanup_leftovers(conn: Hypervisor, domain_name: str, checkpoint_prefix: str,
                      scratch_dir: str) -> list[str]:
    """Module-level form of :meth:`Hypervisor.cleanup_leftovers`."""
    return conn.cleanup_leftovers(domain_name, checkpoint_prefix, scratch_dir)
