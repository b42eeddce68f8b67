"""The HA keys in the coordination store (etcd), typed: /work/wt/HA-CONTRACT.md, mirrored in
docs/operations.md ("High availability: host failure").

Keys, under the agent's prefix (default ``/vmdr/``):

``ha/domains/<vm>``
    the HA VM's current domain XML (text), written by the agent of the host running it;
``ha/where/<vm>``
    ``{"host": str, "time": epoch s}``: where it runs (same writer);
``ha/failovers/<host>``
    an in-flight failover of a failed host (leader): ``{"host", "detected",
    "fence_until", "plan", "started": {vm: t}, "ready": {vm: t}, "done": bool}``;
``ha/events/<%020d ns>-<host>``
    one decision (append only; the leader trims to the newest :data:`EVENTS_KEPT`);
``ha/maintenance/<host>``
    ``{"since", "reason"}``: present = the host is in maintenance (``vmdr ha maintenance``);
``ha/tests/<vm>``
    the last passed failover of the VM: ``{"time", "kind": "test|real", "from", "to",
    "start_s", "ready_s"}``;
``ha/restores/<vm>``, ``ha/restore-claims/<vm>/<id>``, ``ha/restore-status/<vm>/<id>``
    a restore order for a VM without shared storage, its one claim and the target's
    progress (:mod:`vmdr.ha.noshared`).

:class:`HAStore` runs over a small key-value protocol (:class:`KV`): :class:`EtcdKV` (an
:class:`~vmdr.agent.coord_etcd.EtcdCoordinator`'s client, with its endpoint fail-over) or
:class:`MemoryKV` (unit tests). Both count requests (the scale benchmark reports them).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

from vmdr.events import HA_KINDS, HADecision
from vmdr.timeutil import utcnow

__all__ = [
    "EVENTS_KEPT",
    "EVENT_KINDS",
    "KV",
    "EtcdCaller",
    "EtcdKV",
    "HAEventRecord",
    "HAStore",
    "MemoryKV",
]

EVENTS_KEPT = 10_000
EVENT_KINDS = HA_KINDS


class KV(Protocol):
    requests: int

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str) -> None: ...

    def create(self, key: str, value: str) -> bool:
        """Write only if absent; False if the key exists."""

    def delete(self, key: str) -> None: ...

    def items(self, prefix: str) -> list[tuple[str, str]]:
        """(key, value) under *prefix*, in key order."""

    def keys(self, prefix: str) -> list[str]: ...


def _now(now: float | None) -> float:
    return utcnow().timestamp() if now is None else now


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class EtcdCaller(Protocol):
    """What :class:`EtcdKV` needs of ``vmdr.agent.coord_etcd.EtcdCoordinator`` (this
    layer does not import the agent): its key prefix, and ``_call(fn)`` that runs
    ``fn(etcd3gw client)`` trying every endpoint."""

    prefix: str

    def _call(self, fn: Any) -> Any: ...


class EtcdKV:
    """Over an EtcdCoordinator's client (its ``_call`` tries every endpoint)."""

    def __init__(self, coord: EtcdCaller) -> None:
        self.coord = coord
        self.requests = 0

    def _call(self, fn: Any) -> Any:
        self.requests += 1
        return self.coord._call(fn)

    def get(self, key: str) -> str | None:
        v = self._call(lambda c: c.get(key))
        return _s(v[0]) if v else None

    def put(self, key: str, value: str) -> None:
        self._call(lambda c: c.put(key, value))

    def create(self, key: str, value: str) -> bool:
        return bool(self._call(lambda c: c.create(key, value)))

    def delete(self, key: str) -> None:
        self._call(lambda c: c.delete(key))

    def items(self, prefix: str) -> list[tuple[str, str]]:
        rows = self._call(lambda c: c.get_prefix(prefix, sort_order="ascend",
                                                 sort_target="key"))
        return [(_s(meta["key"]), _s(v)) for v, meta in rows]

    def keys(self, prefix: str) -> list[str]:
        return [k for k, _v in self.items(prefix)]


class MemoryKV:
    """A dict with the same semantics (unit tests, simulations); thread-safe."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.requests = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            self.requests += 1
            return self.data.get(key)

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self.requests += 1
            self.data[key] = value

    def create(self, key: str, value: str) -> bool:
        with self._lock:
            self.requests += 1
            if key in self.data:
                return False
            self.data[key] = value
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self.requests += 1
            self.data.pop(key, None)

    def items(self, prefix: str) -> list[tuple[str, str]]:
        with self._lock:
            self.requests += 1
            return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def keys(self, prefix: str) -> list[str]:
        return [k for k, _ in self.items(prefix)]


HAEventRecord = HADecision  # the stored form of an event is the typed event itself


class HAStore:
    """Typed reads and writes of exactly the contract's keys."""

    def __init__(self, kv: KV, prefix: str = "/vmdr/", me: str = "") -> None:
        self.kv = kv
        self.prefix = prefix
        self.me = me  # the writer's host name (event key suffix)
        self._seq = 0

    @classmethod
    def for_coordinator(cls, coord: EtcdCaller, me: str = "") -> HAStore:
        return cls(EtcdKV(coord), coord.prefix, me)

    def _k(self, *parts: str) -> str:
        return self.prefix + "ha/" + "/".join(parts)

    def _json(self, key: str) -> dict[str, Any] | None:
        v = self.kv.get(key)
        return json.loads(v) if v else None

    def _all(self, sub: str) -> dict[str, dict[str, Any]]:
        base = self._k(sub) + "/"
        return {k.removeprefix(base): json.loads(v) for k, v in self.kv.items(base)}

    # -- domains and where they run -----------------------------------------------------
    def put_domain(self, vm: str, xml: str, host: str, now: float | None = None) -> None:
        self.kv.put(self._k("domains", vm), xml)
        self.put_where(vm, host, now)

    def put_where(self, vm: str, host: str, now: float | None = None) -> None:
        self.kv.put(self._k("where", vm),
                    json.dumps({"host": host, "time": _now(now)}))

    def domain(self, vm: str) -> str | None:
        return self.kv.get(self._k("domains", vm))

    def where(self, vm: str) -> str | None:
        d = self._json(self._k("where", vm))
        return str(d["host"]) if d and d.get("host") else None

    def wheres(self) -> dict[str, str]:
        """VM → the host it last ran on."""
        return {vm: str(d.get("host")) for vm, d in self._all("where").items()}

    def domains(self) -> dict[str, str]:
        """Every stored domain XML by VM, in one request."""
        base = self._k("domains") + "/"
        return {k.removeprefix(base): v for k, v in self.kv.items(base)}

    def domain_names(self) -> list[str]:
        base = self._k("domains") + "/"
        return [k.removeprefix(base) for k in self.kv.keys(base)]

    # -- failovers ------------------------------------------------------------------------
    def failover(self, host: str) -> dict[str, Any] | None:
        return self._json(self._k("failovers", host))

    def failovers(self) -> dict[str, dict[str, Any]]:
        return self._all("failovers")

    def create_failover(self, host: str, record: dict[str, Any]) -> bool:
        """Start a failover record; False if one exists (another leader's: resume it)."""
        return self.kv.create(self._k("failovers", host), json.dumps(record))

    def put_failover(self, host: str, record: dict[str, Any]) -> None:
        self.kv.put(self._k("failovers", host), json.dumps(record))

    def delete_failover(self, host: str) -> None:
        self.kv.delete(self._k("failovers", host))

    # -- events ---------------------------------------------------------------------------
    def add_event(self, kind: str, reason: str, *, host: str | None = None,
                  vm: str | None = None, detail: dict[str, Any] | None = None,
                  now: float | None = None) -> HAEventRecord:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown HA event kind {kind!r}")
        t = _now(now)
        ev = HAEventRecord(t, kind, host, vm, reason, detail or {})
        self._seq += 1
        ns = int(t * 1e9) + self._seq % 1000  # same-instant events keep their order
        self.kv.put(self._k("events", f"{ns:020d}-{self.me or host or '-'}"),
                    json.dumps(ev.as_dict()))
        return ev

    def events(self, *, since: float | None = None, vm: str | None = None,
               limit: int | None = None) -> list[HAEventRecord]:
        """Oldest first; *limit* keeps the newest."""
        out = [HAEventRecord.from_dict(json.loads(v))
               for _k, v in self.kv.items(self._k("events") + "/")]
        out = [e for e in out if (since is None or e.time >= since)
               and (vm is None or e.vm == vm)]
        return out[-limit:] if limit else out

    def trim_events(self, keep: int = EVENTS_KEPT) -> int:
        keys = self.kv.keys(self._k("events") + "/")
        old = keys[:-keep] if keep else keys
        for k in old:
            self.kv.delete(k)
        return len(old)

    # -- maintenance ----------------------------------------------------------------------
    def maintenance(self) -> dict[str, dict[str, Any]]:
        return self._all("maintenance")

    def set_maintenance(self, host: str, reason: str, now: float | None = None) -> None:
        self.kv.put(self._k("maintenance", host), json.dumps(
            {"since": _now(now), "reason": reason}))

    def clear_maintenance(self, host: str) -> None:
        self.kv.delete(self._k("maintenance", host))

    # -- failover tests -------------------------------------------------------------------
    def tests(self) -> dict[str, dict[str, Any]]:
        return self._all("tests")

    def test(self, vm: str) -> dict[str, Any] | None:
        return self._json(self._k("tests", vm))

    def put_test(self, vm: str, *, kind: str, from_: str, to: str, start_s: float | None,
                 ready_s: float | None, now: float | None = None) -> None:
        if kind not in ("test", "real"):
            raise ValueError(f"kind must be test or real, not {kind!r}")
        self.kv.put(self._k("tests", vm), json.dumps(
            {"time": _now(now), "kind": kind, "from": from_,
             "to": to, "start_s": start_s, "ready_s": ready_s}))

    # -- restores of VMs without shared storage (vmdr.ha.noshared) ------------------------
    # ha/restores/<vm>: the leader's order; ha/restore-claims/<vm>/<id>: created once, by
    # the target's agent (it runs the order) or by the leader (the order expired unrun);
    # ha/restore-status/<vm>/<id>: the target's progress (running | started | failed)
    def restore_orders(self) -> dict[str, dict[str, Any]]:
        return self._all("restores")

    def restore_order(self, vm: str) -> dict[str, Any] | None:
        return self._json(self._k("restores", vm))

    def put_restore_order(self, vm: str, order: dict[str, Any]) -> None:
        self.kv.put(self._k("restores", vm), json.dumps(order))

    def claim_restore(self, vm: str, order_id: str, claim: dict[str, Any]) -> bool:
        """Create-if-absent: exactly one of the target (to run it) and the leader (to
        give it up) wins an order."""
        return self.kv.create(self._k("restore-claims", vm, order_id), json.dumps(claim))

    def restore_claim(self, vm: str, order_id: str) -> dict[str, Any] | None:
        return self._json(self._k("restore-claims", vm, order_id))

    def put_restore_status(self, vm: str, order_id: str, status: dict[str, Any]) -> None:
        self.kv.put(self._k("restore-status", vm, order_id), json.dumps(status))

    def restore_status(self, vm: str, order_id: str) -> dict[str, Any] | None:
        return self._json(self._k("restore-status", vm, order_id))
