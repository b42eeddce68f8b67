"""What the operator side (maintenance, failover tests, the watchdog's escalation, the
dashboard, the DR plan) reads and writes in etcd: a thin layer over
:class:`vmdr.ha.store.HAStore` (the contract's ``ha/…`` keys) that adds the agents'
membership (``members/<host>``, ``leader``) and typed failover-test records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmdr.timeutil import utcnow

from .store import KV, HAStore, MemoryKV

__all__ = ["FailoverRecord", "HARecords", "MemoryKV", "memory_records"]


@dataclass(frozen=True)
class FailoverRecord:
    """The last passed failover of a VM (``ha/tests/<vm>``)."""

    vm: str
    time: float
    kind: str  # test | real
    source: str | None
    target: str | None
    start_s: float | None
    ready_s: float | None

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "kind": self.kind, "from": self.source, "to": self.target,
                "start_s": self.start_s, "ready_s": self.ready_s}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class HARecords:
    """Typed access to the HA keys and the membership, over one :class:`HAStore`."""

    def __init__(self, store: HAStore, *, clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.kv: KV = store.kv
        self.prefix = store.prefix
        self.clock = clock or (lambda: utcnow().timestamp())

    # -- membership (written by the agents) --------------------------------------------------
    def members(self) -> dict[str, dict[str, Any]]:
        base = f"{self.prefix}members/"
        out: dict[str, dict[str, Any]] = {}
        for k, v in self.kv.items(base):
            try:
                d = json.loads(v)
            except ValueError:
                continue
            if isinstance(d, dict):
                out[k.removeprefix(base)] = d
        return out

    def leader(self) -> str | None:
        return self.kv.get(f"{self.prefix}leader") or None

    def where(self) -> dict[str, str]:
        return self.store.wheres()

    # -- maintenance ---------------------------------------------------------------------------
    def maintenance(self) -> dict[str, dict[str, Any]]:
        return self.store.maintenance()

    def set_maintenance(self, host: str, reason: str) -> None:
        self.store.set_maintenance(host, reason, now=self.clock())

    def clear_maintenance(self, host: str) -> None:
        self.store.clear_maintenance(host)

    # -- failover tests -----------------------------------------------------------------------
    def tests(self) -> dict[str, FailoverRecord]:
        out = {}
        for vm, d in self.store.tests().items():
            t = _num(d.get("time"))
            if t is None:
                continue
            out[vm] = FailoverRecord(vm, t, str(d.get("kind") or "test"), d.get("from"),
                                     d.get("to"), _num(d.get("start_s")),
                                     _num(d.get("ready_s")))
        return out

    def set_test(self, rec: FailoverRecord) -> None:
        self.store.put_test(rec.vm, kind=rec.kind, from_=rec.source or "",
                            to=rec.target or "", start_s=rec.start_s, ready_s=rec.ready_s,
                            now=rec.time)

    # -- events ---------------------------------------------------------------------------
    def event(self, kind: str, reason: str, *, host: str | None = None, vm: str | None = None,
              detail: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.store.add_event(kind, reason, host=host, vm=vm, detail=detail,
                                    now=self.clock()).as_dict()

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first."""
        return [e.as_dict() for e in self.store.events(limit=limit)]


def memory_records(*, me: str = "test", clock: Callable[[], float] | None = None
                   ) -> HARecords:
    """Records in memory (unit tests)."""
    return HARecords(HAStore(MemoryKV(), "/vmdr/", me), clock=clock)
