"""Where the agent learns which VMs exist: libvirt on this host (or a fake for tests)."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from vmdr.agent.scheduler import VMInfo
from vmdr.config import Config
from vmdr.storage.registry import redact

log = logging.getLogger("vmdr.agent")


@dataclass(frozen=True)
class HostInfo:
    """This host's capacity (libvirt ``getInfo``): what a fleet leader places jobs by."""

    name: str
    cpus: int = 0
    memory_mib: int = 0


class VMSource(ABC):
    """The VMs of one host. ``vms()`` is cheap (a cached answer); ``refresh()`` asks."""

    @abstractmethod
    def vms(self) -> list[VMInfo]: ...

    @abstractmethod
    def host_info(self) -> HostInfo: ...

    def refresh(self) -> None:
        """Re-read the inventory (called from a worker thread)."""

    @property
    def error(self) -> str | None:
        """Why the last refresh failed, or None."""
        return None


class StaticVMs(VMSource):
    """A fixed list: unit tests, benchmarks and hosts managed from elsewhere."""

    def __init__(self, vms: list[VMInfo], host: HostInfo) -> None:
        self._vms, self._host = list(vms), host

    def vms(self) -> list[VMInfo]:
        return list(self._vms)

    def host_info(self) -> HostInfo:
        return self._host

    def set(self, vms: list[VMInfo]) -> None:
        self._vms = list(vms)


class LibvirtVMs(VMSource):
    """The domains libvirt knows on ``connect``, refreshed every *ttl* seconds at most.

    Read with ``virsh`` (libvirt-clients) rather than the Python binding: the agent lists
    domains a few times a minute, and not loading libvirt keeps ~10 MB out of its RSS.
    """

    def __init__(self, cfg: Config, host: str, ttl: float = 15.0) -> None:
        self.uri, self.host, self.ttl = cfg.connect, host, ttl
        self.cfg = cfg
        self._vms: list[VMInfo] = []
        self._info = HostInfo(host)
        self._at = 0.0
        self._error: str | None = None
        self._lock = threading.Lock()

    def vms(self) -> list[VMInfo]:
        return list(self._vms)

    def host_info(self) -> HostInfo:
        return self._info

    @property
    def error(self) -> str | None:
        return self._error

    def _virsh(self, *args: str) -> str:
        p = subprocess.run(["virsh", "-r", "-q", "-c", self.uri, *args], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError((p.stderr.strip().splitlines() or ["virsh failed"])[-1])
        return p.stdout

    def refresh(self) -> None:
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._at < self.ttl and self._vms:
                return
            try:
                every = [n for n in self._virsh("list", "--all", "--name").split() if n]
                running = set(self._virsh("list", "--name").split())
                info = dict(line.split(":", 1) for line in self._virsh("nodeinfo").splitlines()
                            if ":" in line)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                if self._error is None:
                    log.warning("cannot list VMs on %s: %s", redact(self.uri), exc)
                self._error = str(exc)
                return
            self._error = None
            tiers = {n: v.extra.get("tier") for n, v in self.cfg.vms.items()}
            self._vms = [VMInfo(n, self.host, n in running, _str(tiers.get(n)))
                         for n in sorted(every)]
            cpus = info.get("CPU(s)", "0").strip()
            mem = info.get("Memory size", "0 KiB").strip().split()[0]
            self._info = HostInfo(self.host, int(cpus) if cpus.isdigit() else 0,
                                  int(mem) // 1024 if mem.isdigit() else 0)
            self._at = time.monotonic()
        finally:
            self._lock.release()


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None
