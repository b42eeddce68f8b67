"""The etcd coordination store (``[agent] etcd = ["http://10.0.0.1:2379", …]``), over
etcd's HTTP/JSON gateway (``etcd3gw``; it works with Debian's etcd 3.4).

Keys, under ``/vmdr/``:

``members/<host>``
    JSON: the host's capacity (libvirt ``getInfo``), its VMs and which run, its API
    address. Attached to the agent's own lease: it vanishes TTL seconds after the agent
    stops renewing, which is how the leader (and the HA issue) learns that a host is gone.
``leader``
    The leader's host name, attached to the leader's lease and created only if absent
    (a transaction on ``create_revision == 0``).
``schedule/<policy>:<kind>``
    The last calendar time handled, moved only by compare-and-set on its value.

Timing (``lease_ttl``, default 10 s; the agent cycles every second):

* every cycle renews the lease; a member is seen gone at most TTL after its last renewal;
* a leader that fails to renew stops scheduling in the same cycle (``tick`` raises, the
  daemon counts that as "not leader"), so it stops ≥ TTL − 1 s before anyone else can
  take the leader key: never two schedulers;
* a new leader reads the schedule state and fires what elapsed meanwhile, once (catch-up);
  jobs carry deterministic ids (schedule, VM, due time), so a run the old leader queued
  just before it died is not queued twice.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from typing import Any
from urllib.parse import urlsplit

from vmdr.agent.coord import Coordinator, Member
from vmdr.errors import UsageError

log = logging.getLogger("vmdr.agent")
PREFIX = "/vmdr/"


def quiet_strict_warning() -> None:
    """Ignore urllib3's FutureWarning "The 'strict' parameter is no longer needed" (and
    only it): requests before 2.30 (Debian 12's) passes ``strict`` to urllib3 2.x on every
    request etcd3gw makes, which flooded the agent's log with one warning per call."""
    warnings.filterwarnings("ignore", message=r"The 'strict' parameter is no longer needed",
                            category=FutureWarning, module=r"urllib3\.poolmanager")


def _fmt(x: float) -> str:
    return f"{x:.6f}"


class EtcdCoordinator(Coordinator):
    name = "etcd"

    def __init__(self, endpoints: list[str], ttl: float = 10.0, prefix: str = PREFIX) -> None:
        try:
            import etcd3gw
        except ImportError:
            raise UsageError("agent.etcd needs the etcd3gw package: pip install "
                             "'vmdr[fleet]'") from None
        if not endpoints:
            raise UsageError("agent.etcd: give at least one endpoint")
        self._etcd3gw = etcd3gw
        self.endpoints = endpoints
        self.ttl = max(2, int(ttl))
        self.prefix = prefix
        self._i = 0
        self._client: Any = None
        self._lease: Any = None
        self._host: str | None = None
        self._leader = False
        self._members: list[Member] = []
        # monotonic time at which the last *successful* lease renewal (or grant) was sent:
        # the self-fencing deadline counts from it (vmdr.ha.settings, vmdr.ha.fencing)
        self.last_renew_sent: float | None = None
        self.ever_seen: set[str] = set()  # every member host seen while this agent ran

    # -- connection -----------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._client is None:
            quiet_strict_warning()
            u = urlsplit(self.endpoints[self._i % len(self.endpoints)])
            self._client = self._etcd3gw.client(
                host=u.hostname or "127.0.0.1", port=u.port or 2379,
                protocol=u.scheme or "http", timeout=max(1.0, self.ttl / 4))
        return self._client

    def _call(self, fn: Any) -> Any:
        """Run *fn(client)*, trying each endpoint once; the last error propagates."""
        err: Exception | None = None
        for _ in range(len(self.endpoints)):
            try:
                return fn(self._connect())
            except Exception as exc:
                err = exc
                self._client, self._lease = None, None  # a lease object holds its client
                self._i += 1
        assert err is not None
        raise err

    # -- Coordinator ------------------------------------------------------------------------
    def tick(self, me: Member, now: float) -> bool:
        self._host = me.host
        self._leader = False  # until proven below: any error leaves it False

        def renew(c: Any) -> bool:
            sent = time.monotonic()
            if self._lease is None or self._lease.refresh() <= 0:
                sent = time.monotonic()
                self._lease = c.lease(self.ttl)
            self.last_renew_sent = sent
            me.seen = now
            key = f"{self.prefix}members/{me.host}"
            leader_key = f"{self.prefix}leader"
            current = c.get(leader_key)
            if not current:
                if c.create(leader_key, me.host, lease=self._lease):
                    log.info("took the leader key (lease TTL %ds)", self.ttl)
                current = c.get(leader_key)
            leader = bool(current) and _s(current[0]) == me.host
            me.leader = leader
            c.put(key, json.dumps(me.as_dict()), lease=self._lease)
            self._members = self._parse_members(c.get_prefix(f"{self.prefix}members/"))
            return leader

        self._leader = bool(self._call(renew))
        return self._leader

    def members(self) -> list[Member]:
        return list(self._members)

    def _parse_members(self, rows: Any) -> list[Member]:
        out = [Member(**{k: v for k, v in json.loads(_s(v)).items()
                         if k in Member.__dataclass_fields__}) for v, _ in rows]
        self.ever_seen.update(m.host for m in out)
        return out

    def read_members(self) -> list[Member]:
        """A fresh read of the live members (the HA leader polls faster than the cycle)."""
        return self._parse_members(
            self._call(lambda c: c.get_prefix(f"{self.prefix}members/")))

    def holds_lease(self, fence_after: float) -> bool:
        """Whether the last successful renewal was sent less than *fence_after* seconds ago
        (the HA leader acts only then; see vmdr.ha.fencing)."""
        sent = self.last_renew_sent
        return sent is not None and time.monotonic() < sent + fence_after

    def schedule_state(self) -> dict[str, float]:
        rows = self._call(lambda c: c.get_prefix(f"{self.prefix}schedule/"))
        out = {}
        for v, meta in rows:
            key = _s(meta["key"]).removeprefix(f"{self.prefix}schedule/")
            out[key] = float(_s(v))
        return out

    def advance(self, key: str, expected: float | None, new: float) -> bool:
        if not self._leader:
            return False
        k = f"{self.prefix}schedule/{key}"
        if expected is None:
            return bool(self._call(lambda c: c.create(k, _fmt(new))))
        return bool(self._call(lambda c: c.replace(k, _fmt(expected), _fmt(new))))

    def close(self) -> None:
        """A clean stop revokes the lease: the leader key and membership go at once."""
        if self._lease is not None:
            try:
                self._lease.revoke()
            except Exception as exc:
                log.warning("could not revoke the etcd lease: %s", exc)
        self._lease = None
        self._leader = False


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def wait_for(endpoints: list[str], timeout: float = 10.0) -> None:
    """Block until one endpoint answers (tests, start-up)."""
    deadline = time.monotonic() + timeout
    coord = EtcdCoordinator(endpoints)
    while True:
        try:
            coord._call(lambda c: c.status())
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
