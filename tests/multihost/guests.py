"""Test guests on the namespace hosts, and live migration between them.

Images are copies of the test estate (tests/guest) in a directory every host sees: the
cluster's shared directory (shared storage) or a host's own image directory (local
storage). Each guest has its own copies because libvirt chowns what it starts.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.guest import layout as L
from tests.guest.domxml import make_domain_xml
from tests.guest.estate import ensure_built

if TYPE_CHECKING:
    from tests.multihost.hosts import Host

__all__ = ["Guest", "migrate"]

_HEARTBEAT_RE = re.compile(rf"{L.HEARTBEAT_MARKER} (\d+) ([\d.]+)")
_WRITER_RE = re.compile(rf"{L.WRITER_MARKER} seq=(\d+)")
_counter = itertools.count(1)


class Guest:
    """A test guest whose disks live in ``storage`` (a directory every host can read).

    ``start(host)`` defines (if needed) and starts it on ``host``; ``wait_heartbeat()``
    follows the console log, which starts afresh on every start.
    """

    __test__ = False

    def __init__(self, prefix: str, storage: Path, *, name: str | None = None,
                 writer_rate: int = 20, memory_mib: int = 128) -> None:
        self.name = name or f"{prefix}-g{next(_counter)}"
        self.dir = storage / self.name
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o777)  # virtlogd and QEMU (libvirt-qemu) write here
        images = ensure_built()
        self.boot_disk = self.dir / "boot.qcow2"
        self.data_disk = self.dir / "data.qcow2"
        for src, dst in ((images.boot_disk, self.boot_disk), (images.data_disk, self.data_disk)):
            subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
            os.chmod(dst, 0o644)
        self.console_log = self.dir / "console.log"
        self.xml = make_domain_xml(self.name, self.boot_disk, self.data_disk,
                                   console_log=self.console_log, writer_rate=writer_rate,
                                   memory_mib=memory_mib)
        self.host: Host | None = None
        self.started_at = 0.0
        self.known: set[Host] = set()

    # -- lifecycle --------------------------------------------------------------------------
    def define(self, host: Host) -> Any:
        self.known.add(host)
        return host.conn().defineXML(self.xml)

    def domain(self, host: Host | None = None) -> Any:
        h = host or self.host
        if h is None:
            raise RuntimeError(f"{self.name} is not on any host")
        return h.conn().lookupByName(self.name)

    def start(self, host: Host) -> None:
        """Define the guest on ``host`` (if it is not yet) and start it there."""
        import libvirt

        try:
            dom = self.domain(host)
        except libvirt.libvirtError:
            dom = self.define(host)
        self.known.add(host)
        self.started_at = time.monotonic()
        dom.create()
        self.host = host

    def is_running_on(self, host: Host) -> bool:
        import libvirt

        if not host.alive():
            return False
        try:
            return bool(self.domain(host).isActive())
        except libvirt.libvirtError:
            return False

    def destroy(self, host: Host | None = None) -> None:
        import libvirt

        try:
            dom = self.domain(host)
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass

    def cleanup(self) -> None:
        """Destroy and undefine on every live host that knew it; delete its files."""
        import libvirt

        for host in self.known:
            if not host.alive():
                continue
            try:
                dom = host.conn().lookupByName(self.name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- console ----------------------------------------------------------------------------
    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def heartbeats(self) -> list[int]:
        return [int(n) for n, _ in _HEARTBEAT_RE.findall(self.console_text())]

    def writer_seq(self) -> int | None:
        found = _WRITER_RE.findall(self.console_text())
        return int(found[-1]) if found else None

    def wait_for(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {what} within {timeout}s; console tail:\n"
                                   f"{self.console_text()[-1500:]}")
            time.sleep(0.2)

    def wait_heartbeat(self, timeout: float = 60.0, count: int = 1) -> float:
        """Wait for heartbeat number >= ``count``; seconds since the last start()."""
        self.wait_for(f"heartbeat {count}",
                      lambda: (b := self.heartbeats()) and b[-1] >= count, timeout)
        return time.monotonic() - self.started_at

    def wait_writer(self, above: int = -1, timeout: float = 60.0) -> int:
        """Wait for a ``VMDR-WRITER seq=N`` with N > ``above``; returns N."""
        return int(self.wait_for(f"writer seq > {above}",
                                 lambda: (s := self.writer_seq()) is not None and s > above
                                 and s, timeout))


def migrate(guest: Guest, src: Host, dst: Host, *, timeout: float = 120) -> float:
    """Live-migrate ``guest`` from ``src`` to ``dst`` (peer-to-peer over qemu+tcp on the
    test network, run inside ``src``); returns the seconds it took. ``--unsafe`` because
    the shared storage is a plain directory, not a cluster filesystem."""
    t0 = time.monotonic()
    src.close_connections()
    src.run("virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p", "--persistent",
            "--undefinesource", "--unsafe", guest.name, dst.tcp_uri,
            "--migrateuri", f"tcp://{dst.addr}:49152", timeout=timeout)
    guest.host = dst
    guest.known.add(dst)
    return time.monotonic() - t0
