"""Open a libvirt connection and offer vmdr's hypervisor operations on it."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from vmdr.errors import HypervisorError

from . import checkpoints, cleanup, domain, lifecycle, state
from ._compat import lv
from .backup import BackupOptions, BackupSession, Method
from .domain import DomainInfo
from .errors import libvirt_errors

DEFAULT_URI = "qemu:///system"


def _silence(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


def is_local_uri(uri: str) -> bool:
    """True when the URI names this host (no hostname, or localhost)."""
    host = urlparse(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


def connect(uri: str | None = None, *, readonly: bool = False) -> Hypervisor:
    """Open ``uri`` (default qemu:///system; qemu+ssh://host/system works too)."""
    m = lv()
    uri = uri or DEFAULT_URI
    m.registerErrorHandler(_silence, None)
    with libvirt_errors(f"cannot connect to {uri}", opening=True):
        conn = m.openReadOnly(uri) if readonly else m.open(uri)
    if conn is None:
        raise HypervisorError(f"cannot connect to {uri}")
    return Hypervisor(conn, uri)


class Hypervisor:
    """One libvirt connection; every libvirt error leaves as a vmdr error."""

    def __init__(self, conn: Any, uri: str) -> None:
        self.conn = conn
        self.uri = uri
        self.local = is_local_uri(uri)
        self.system = urlparse(uri).path.rstrip("/") == "/system"

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        try:
            self.conn.close()
        except lv().libvirtError:
            pass

    # -- inspection --------------------------------------------------------------------------

    def lookup(self, name: str) -> Any:
        """The raw virDomain for a name or UUID (DomainNotFound)."""
        with libvirt_errors(f"domain {name}"):
            if len(name) == 36 and name.count("-") == 4:
                try:
                    return self.conn.lookupByUUIDString(name)
                except lv().libvirtError:
                    pass
            return self.conn.lookupByName(name)

    def domain(self, name: str) -> DomainInfo:
        """Inspect a domain (DomainNotFound if there is none)."""
        return domain.inspect(self.lookup(name), system=self.system)

    def list_domains(self) -> list[str]:
        """Names of all domains, running or not."""
        with libvirt_errors("listing domains"):
            return sorted(d.name() for d in self.conn.listAllDomains(0))

    def read_nvram(self, info: DomainInfo) -> bytes | None:
        """The UEFI NVRAM file's bytes, or None if the domain has none."""
        if info.nvram_path is None:
            return None
        self._need_local("reading NVRAM")
        try:
            with open(info.nvram_path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_tpm_state(self, info: DomainInfo) -> bytes | None:
        """The swtpm state directory as an uncompressed tar, or None if there is none."""
        if info.tpm_state_dir is None:
            return None
        self._need_local("reading TPM state")
        if not os.path.isdir(info.tpm_state_dir):
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(info.tpm_state_dir, arcname=".")
        return buf.getvalue()

    def _need_local(self, what: str) -> None:
        if not self.local:
            raise HypervisorError(f"{what} needs a local hypervisor, not {self.uri}")

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
        opts = BackupOptions(
            checkpoint_prefix=checkpoint_prefix, scratch_dir=scratch_dir, disks=disks,
            incremental_from=incremental_from, quiesce=quiesce, method=method, now=now,
            qemu_user=state.qemu_user() if self.system else None)
        return BackupSession(self.lookup(info.uuid), info, opts, local=self.local)

    def list_checkpoints(self, info: DomainInfo, prefix: str) -> list[str]:
        """This prefix's checkpoint names, oldest first."""
        return checkpoints.list_ours(self.lookup(info.uuid), prefix)

    def checkpoint_xml(self, info: DomainInfo, name: str) -> str:
        """A checkpoint's full XML (what :meth:`redefine_checkpoint` takes)."""
        return checkpoints.full_xml(self.lookup(info.uuid), name)

    def redefine_checkpoint(self, info: DomainInfo, saved_checkpoint_xml: str) -> str:
        """Recreate lost checkpoint metadata; validated against the bitmaps when running."""
        dom = self.lookup(info.uuid)
        with libvirt_errors("checking domain"):
            running = bool(dom.isActive())
        return checkpoints.redefine(dom, saved_checkpoint_xml, validate=running)

    def delete_checkpoint(self, info: DomainInfo, name: str) -> bool:
        """Delete one checkpoint; False if it did not exist."""
        with libvirt_errors(f"deleting checkpoint {name}"):
            return checkpoints.delete(self.lookup(info.uuid), name)

    def cleanup_leftovers(self, name: str, checkpoint_prefix: str, scratch_dir: str) -> list[str]:
        """Undo an interrupted backup of ``name`` (see :mod:`.cleanup`); what was done."""
        return cleanup.cleanup_domain(self.lookup(name), checkpoint_prefix, scratch_dir)

    # -- restore -----------------------------------------------------------------------------

    def define(self, xml: str) -> str:
        """Define a domain from XML; its name."""
        return lifecycle.define(self.conn, xml)

    def start(self, name: str) -> None:
        """Start a defined domain."""
        lifecycle.start(self.lookup(name))

    def destroy(self, name: str) -> None:
        """Power a domain off (no error if already off)."""
        lifecycle.destroy(self.lookup(name))

    def undefine(self, name: str) -> None:
        """Remove a domain definition (with NVRAM and checkpoint metadata)."""
        lifecycle.undefine(self.lookup(name))

    def wait_heartbeat(self, name: str, *, agent: bool = True, console_pattern: str | None = None,
                       console_log: str | None = None, timeout: float = 300.0) -> float:
        """Seconds until the guest shows life (agent ping or console regex)."""
        return lifecycle.wait_heartbeat(self.lookup(name), agent_ping=agent,
                                        console_pattern=console_pattern,
                                        console_log=console_log, timeout=timeout)


def cleanup_leftovers(conn: Hypervisor, domain_name: str, checkpoint_prefix: str,
                      scratch_dir: str) -> list[str]:
    """Module-level form of :meth:`Hypervisor.cleanup_leftovers`."""
    return conn.cleanup_leftovers(domain_name, checkpoint_prefix, scratch_dir)
