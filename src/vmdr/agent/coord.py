"""The coordination store: membership, leadership and schedule state, behind one small ABC.

Patroni's shape (an abstract DCS with etcd, Consul and ZooKeeper behind it), in our words:

* :class:`Embedded` — one host, no external service: this agent is always the leader and
  the schedule state lives in the job history (SQLite or PostgreSQL).
* an etcd store (``[agent] etcd = [...]``) — every agent keeps a member key under its own
  lease (its capacity and running VMs), one holds the leader key under a lease, and the
  schedule state is moved by compare-and-set so a new leader neither misses nor repeats a
  run. See docs/operations.md, "Fleet mode".

Contract: ``tick()`` is called once per agent cycle and returns whether this agent may
schedule now. A leader that cannot renew its lease must return False at once (no split
brain: it stops scheduling before its lease can expire and another can take over).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from vmdr.agent.history import History


@dataclass
class Member:
    host: str
    api: str  # the member's API base URL
    cpus: int = 0
    memory_mib: int = 0
    running_vms: list[str] = field(default_factory=list)
    leader: bool = False
    seen: float = 0.0
    vms: list[dict[str, Any]] = field(default_factory=list)  # name, running, tier
    # HA: False while this host's own libvirt does not answer (libvirtd died), since
    # when (wall time) and why; such a host is alive but never a failover target
    libvirt_ok: bool = True
    libvirt_down: float = 0.0
    libvirt_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "api": self.api, "cpus": self.cpus,
                "memory_mib": self.memory_mib, "running_vms": self.running_vms,
                "leader": self.leader, "seen": self.seen, "vms": self.vms,
                "libvirt_ok": self.libvirt_ok,
                "libvirt_down": self.libvirt_down, "libvirt_error": self.libvirt_error}


class Coordinator(ABC):
    """Membership, leadership and schedule state."""

    name = "abstract"

    @abstractmethod
    def tick(self, me: Member, now: float) -> bool:
        """Renew this agent's membership; True while it is (or just became) the leader."""

    @abstractmethod
    def members(self) -> list[Member]:
        """Every live member (their leases have not expired)."""

    @abstractmethod
    def schedule_state(self) -> dict[str, float]:
        """Schedule key → the last calendar time handled."""

    @abstractmethod
    def advance(self, key: str, expected: float | None, new: float) -> bool:
        """Compare-and-set one schedule's state; False if it was moved by someone else."""

    def leader(self) -> str | None:
        for m in self.members():
            if m.leader:
                return m.host
        return None

    def close(self) -> None:
        """Give up leadership and membership (a clean stop hands over at once)."""


class Embedded(Coordinator):
    """One host: always the leader, state in the history database."""

    name = "embedded"

    def __init__(self, history: History) -> None:
        self.history = history
        self._me: Member | None = None

    def tick(self, me: Member, now: float) -> bool:
        me.leader, me.seen = True, now
        self._me = me
        return True

    def members(self) -> list[Member]:
        return [self._me] if self._me else []

    def schedule_state(self) -> dict[str, float]:
        return self.history.schedule_state()

    def advance(self, key: str, expected: float | None, new: float) -> bool:
        return self.history.advance_schedule(key, expected, new)
