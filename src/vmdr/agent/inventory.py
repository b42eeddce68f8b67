"""Where the agent learns which VMs exist: libvirt on this host (or a fake for tests)."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from vmdr.agent.scheduler import VMInfo
from vmdr.config import Config

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
    """The domains libvirt knows on ``connect``, refreshed every *ttl* seconds at most."""

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

    def refresh(self) -> None:
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._at < self.ttl and self._vms:
                return
            from vmdr.hypervisor import connect

            try:
                with connect(self.uri, readonly=True) as hv:
                    doms = [(d.name(), bool(d.isActive())) for d in hv.conn.listAllDomains(0)]
                    info = hv.conn.getInfo()
            except Exception as exc:
                if self._error is None:
                    log.warning("cannot list VMs on %s: %s", self.uri, exc)
                self._error = str(exc)
                return
            self._error = None
            tiers = {n: v.extra.get("tier") for n, v in self.cfg.vms.items()}
            self._vms = [VMInfo(n, self.host, running, _str(tiers.get(n)))
                         for n, running in sorted(doms)]
            self._info = HostInfo(self.host, int(info[2]), int(info[1]))
            self._at = time.monotonic()
        finally:
            self._lock.release()


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None
