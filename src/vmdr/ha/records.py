"""The HA keys of /work/wt/HA-CONTRACT.md that the operator side reads and writes, over
any key-value client (etcd through :class:`EtcdKV`, or :class:`MemoryKV` in tests).

Keys, under the agent's prefix (default ``/vmdr/``)::

    members/<host>            Member JSON (capacity, VMs, API), under the host's lease
    leader                    the leader's host name
    ha/where/<vm>             {"host": ...}: where an HA VM runs now
    ha/maintenance/<host>     {"since": epoch s, "reason": str}: never a target
    ha/tests/<vm>             the last passed failover: {"time", "kind": "test"|"real",
                              "from", "to", "start_s", "ready_s"}
    ha/events/<%020d ns>-<host>   {"time", "kind", "host", "vm", "reason", "detail"}

This module knows no etcd library: :class:`EtcdKV` wraps an ``etcd3gw`` client handed in
(the CLI and the agent make it). ``vmdr.ha.store`` (the failover engine's typed store)
reads and writes the same keys.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from vmdr.errors import UsageError
from vmdr.timeutil import utcnow

__all__ = ["KV", "EtcdKV", "FailoverRecord", "HARecords", "MemoryKV"]

EVENT_KINDS = ("detected", "fenced", "self-fenced", "placed", "started", "ready", "gave-up",
               "migrated", "maintenance", "tested", "restored")


class KV(Protocol):
    """The few key-value operations the records need (values are text)."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> None: ...

    def get_prefix(self, prefix: str) -> list[tuple[str, str]]: ...


class MemoryKV:
    """An in-memory KV (unit tests, and a fleet-less dry run)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            return self.data.get(key)

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self.data[key] = value

    def delete(self, key: str) -> None:
        with self._lock:
            self.data.pop(key, None)

    def get_prefix(self, prefix: str) -> list[tuple[str, str]]:
        with self._lock:
            return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class EtcdKV:
    """:class:`KV` over ``etcd3gw`` clients, one per endpoint, tried in turn (``get`` → list
    of values, ``get_prefix`` → (value, metadata) pairs). The last error propagates."""

    def __init__(self, clients: list[Any]) -> None:
        self.clients = clients
        self._i = 0

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        err: Exception | None = None
        for _ in range(len(self.clients)):
            try:
                return fn(self.clients[self._i % len(self.clients)])
            except Exception as exc:
                err = exc
                self._i += 1
        assert err is not None
        raise err

    def get(self, key: str) -> str | None:
        got = self._call(lambda c: c.get(key))
        return _s(got[0]) if got else None

    def put(self, key: str, value: str) -> None:
        self._call(lambda c: c.put(key, value))

    def delete(self, key: str) -> None:
        self._call(lambda c: c.delete(key))

    def get_prefix(self, prefix: str) -> list[tuple[str, str]]:
        rows = self._call(lambda c: c.get_prefix(prefix))
        return sorted((_s(meta["key"]), _s(v)) for v, meta in rows)


def etcd_records(endpoints: list[str], prefix: str = "/vmdr/", *, me: str = "cli",
                 timeout: float = 5.0) -> HARecords:
    """:class:`HARecords` over the etcd ``endpoints`` (``http://host:2379``), through its
    HTTP gateway (the ``etcd3gw`` package, ``vmdr[fleet]``)."""
    try:
        import etcd3gw  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise UsageError("the fleet's etcd needs the etcd3gw package: pip install "
                         "'vmdr[fleet]'") from None
    if not endpoints:
        raise UsageError("agent.etcd: give at least one endpoint")
    clients = []
    for e in endpoints:
        u = urlsplit(e)
        clients.append(etcd3gw.client(host=u.hostname or "127.0.0.1", port=u.port or 2379,
                                      protocol=u.scheme or "http", timeout=timeout))
    return HARecords(EtcdKV(clients), prefix, me=me)


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


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class HARecords:
    """Typed access to the HA keys (see the module docstring)."""

    def __init__(self, kv: KV, prefix: str = "/vmdr/", *,
                 clock: Callable[[], float] | None = None, me: str = "cli") -> None:
        self.kv = kv
        self.prefix = prefix
        self.clock = clock or (lambda: utcnow().timestamp())
        self.me = me  # the host name in event keys

    def _k(self, rest: str) -> str:
        return f"{self.prefix}{rest}"

    def _table(self, rest: str) -> dict[str, Any]:
        base = self._k(rest)
        out: dict[str, Any] = {}
        for k, v in self.kv.get_prefix(base):
            val = _json(v)
            if isinstance(val, dict):
                out[k[len(base):]] = val
        return out

    # -- membership (written by the agents) --------------------------------------------------
    def members(self) -> dict[str, dict[str, Any]]:
        return self._table("members/")

    def leader(self) -> str | None:
        v = self.kv.get(self._k("leader"))
        return v or None

    def where(self) -> dict[str, str]:
        return {vm: str(d["host"]) for vm, d in self._table("ha/where/").items()
                if isinstance(d.get("host"), str)}

    # -- maintenance ---------------------------------------------------------------------------
    def maintenance(self) -> dict[str, dict[str, Any]]:
        return self._table("ha/maintenance/")

    def set_maintenance(self, host: str, reason: str) -> None:
        self.kv.put(self._k(f"ha/maintenance/{host}"),
                    json.dumps({"since": self.clock(), "reason": reason}))

    def clear_maintenance(self, host: str) -> None:
        self.kv.delete(self._k(f"ha/maintenance/{host}"))

    # -- failover tests -----------------------------------------------------------------------
    def tests(self) -> dict[str, FailoverRecord]:
        out = {}
        for vm, d in self._table("ha/tests/").items():
            t = _num(d.get("time"))
            if t is None:
                continue
            out[vm] = FailoverRecord(vm, t, str(d.get("kind") or "test"), d.get("from"),
                                 d.get("to"), _num(d.get("start_s")), _num(d.get("ready_s")))
        return out

    def set_test(self, rec: FailoverRecord) -> None:
        self.kv.put(self._k(f"ha/tests/{rec.vm}"), json.dumps(rec.to_json()))

    # -- events ---------------------------------------------------------------------------
    def event(self, kind: str, reason: str, *, host: str | None = None, vm: str | None = None,
              detail: dict[str, Any] | None = None) -> dict[str, Any]:
        now = self.clock()
        ev = {"time": now, "kind": kind, "host": host, "vm": vm, "reason": reason,
              "detail": detail or {}}
        self.kv.put(self._k(f"ha/events/{int(now * 1e9):020d}-{self.me}"), json.dumps(ev))
        return ev

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` events, oldest first."""
        rows = [(k, _json(v)) for k, v in self.kv.get_prefix(self._k("ha/events/"))]
        return [v for _, v in sorted(rows)[-limit:] if isinstance(v, dict)]
