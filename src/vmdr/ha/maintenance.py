"""Host maintenance: live-migrate a host's VMs away by the placement rules, and keep the
host out of every placement while ``ha/maintenance/<host>`` exists.

:func:`evacuation` decides (pure): every VM running on the host is placed on the other
hosts that are up, out of maintenance and of known capacity, with the same rules as a
failover (:func:`vmdr.ha.placement.place`: capacity, anti-affinity, host affinity; VMs not
under HA keep their inventory rules). :func:`enter` refuses before changing anything when
the host is the last one, or when any VM has nowhere to go; otherwise it marks the host,
records a ``maintenance`` event and migrates the VMs one by one (a ``migrated`` event
each). :func:`leave` clears the mark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from vmdr.errors import HypervisorError, NoPlacement, UsageError
from vmdr.plan.inventory import Inventory

from .fleet import Connect, Live, all_rules, live_state
from .model import ClusterState, HAPolicy
from .placement import place
from .records import HARecords

__all__ = ["Evacuation", "Move", "NowhereToGo", "enter", "evacuation", "leave",
           "migration_uris"]


NowhereToGo = NoPlacement  # refused, nothing moved (exit 44)


@dataclass
class Move:
    vm: str
    source: str
    target: str
    seconds: float | None = None
    error: str | None = None


@dataclass
class Evacuation:
    host: str
    moves: list[Move] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    already: bool = False  # the host was in maintenance before

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "already_in_maintenance": self.already,
                "moves": [{"vm": m.vm, "from": m.source, "to": m.target,
                           "seconds": None if m.seconds is None else round(m.seconds, 2),
                           "error": m.error} for m in self.moves],
                "unplaced": [{"vm": vm, "reason": why}
                             for vm, why in sorted(self.unplaced.items())],
                "notes": self.notes}


def evacuation(inv: Inventory, policy: HAPolicy, state: ClusterState, host: str,
               running: dict[str, str]) -> Evacuation:
    """Where each VM running on ``host`` goes (pure)."""
    vms = sorted(vm for vm, h in running.items() if h == host)
    rules = all_rules(inv, policy, vms)
    after = ClusterState(
        {n: replace(h, maintenance=h.maintenance or n == host)
         for n, h in state.hosts.items()},
        {n: replace(v, running=False) if n in vms else v for n, v in state.vms.items()})
    p = place(rules, after, vms)
    ev = Evacuation(host, [Move(vm, host, p.placed[vm]) for vm in vms if vm in p.placed],
                    dict(p.unplaced), list(p.notes))
    return ev


def migration_uris(inv: Inventory, host: str) -> tuple[str, str | None]:
    """(the libvirt URI another host's libvirtd reaches ``host`` by, QEMU's migration
    URI): ``hosts.NAME.migration_uri`` (default: ``uri``), and ``tcp://`` its host name
    (so QEMU does not depend on the destination's own host name resolving)."""
    h = inv.hosts[host]
    uri = h.migration_uri or h.uri
    if not uri:
        raise UsageError(f"hosts.{host}: no migration_uri or uri: the other hosts cannot "
                         "reach it for live migration")
    name = urlsplit(uri).hostname
    return uri, (f"tcp://{name}" if name else None)


def _why_not(live: Live, host: str) -> str:
    if host in live.unreachable:
        return "unreachable"
    return "in maintenance" if live.state.hosts[host].maintenance else "capacity unknown"


def _others(state: ClusterState, host: str) -> list[str]:
    return sorted(n for n, h in state.hosts.items() if n != host and h.eligible)


def enter(inv: Inventory, policy: HAPolicy, records: HARecords, connect: Connect, host: str,
          *, reason: str = "", unsafe: bool = False,
          clock: Callable[[], float] = time.monotonic) -> Evacuation:
    """Put ``host`` in maintenance and migrate its VMs away (see the module docstring)."""
    if host not in inv.hosts:
        known = ", ".join(sorted(inv.hosts)) or "none declared in [hosts]"
        raise UsageError(f"unknown host {host!r} (known: {known})")
    live: Live = live_state(inv, connect, records)
    if host in live.unreachable:
        raise HypervisorError(f"{host}: cannot reach its libvirt to migrate its VMs: "
                              f"{live.unreachable[host]}")
    ev = evacuation(inv, policy, live.state, host, live.running)
    ev.already = host in live.maintenance
    if ev.moves or ev.unplaced:
        if not _others(live.state, host):
            why = [f"{n}: {_why_not(live, n)}" for n in sorted(live.state.hosts) if n != host]
            raise NowhereToGo(f"{host} is the last host up and out of maintenance"
                              + (f" ({'; '.join(why)})" if why else "")
                              + ": its VMs have nowhere to go; nothing moved")
        if ev.unplaced:
            vms = "; ".join(f"{vm}: {why}" for vm, why in sorted(ev.unplaced.items()))
            raise NowhereToGo(f"cannot put {host} in maintenance, nowhere to go for {vms}; "
                              "nothing moved")
    targets = {m.target: migration_uris(inv, m.target) for m in ev.moves}
    records.set_maintenance(host, reason or "vmdr ha maintenance")
    records.event("maintenance", f"{host} enters maintenance: {len(ev.moves)} VM(s) to "
                                 "migrate" + (f" ({reason})" if reason else ""), host=host,
                  detail={"moves": {m.vm: m.target for m in ev.moves}})
    hv = connect(host)
    try:
        for m in ev.moves:
            dest, data_uri = targets[m.target]
            t0 = clock()
            try:
                hv.lookup(m.vm).migrate(dest, migrate_uri=data_uri, unsafe=unsafe)
            except HypervisorError as exc:
                m.error = exc.message
                records.event("gave-up", f"live migration of {m.vm} to {m.target} failed: "
                                         f"{exc.message}", host=host, vm=m.vm,
                              detail={"from": host, "to": m.target})
                raise HypervisorError(f"migrating {m.vm} to {m.target} failed: "
                                      f"{exc.message}; {host} stays in maintenance, "
                                      f"{sum(1 for x in ev.moves if x.seconds is not None)} "
                                      f"of {len(ev.moves)} VM(s) moved") from None
            m.seconds = clock() - t0
            records.event("migrated", f"{m.vm} live-migrated from {host} to {m.target} "
                                      f"in {m.seconds:.1f}s (maintenance of {host})",
                          host=m.target, vm=m.vm,
                          detail={"from": host, "to": m.target, "seconds": m.seconds})
    finally:
        hv.close()
    return ev


def leave(inv: Inventory, records: HARecords, host: str) -> bool:
    """End the maintenance of ``host``; False if it was not in maintenance."""
    if host not in inv.hosts:
        known = ", ".join(sorted(inv.hosts)) or "none declared in [hosts]"
        raise UsageError(f"unknown host {host!r} (known: {known})")
    if host not in records.maintenance():
        return False
    records.clear_maintenance(host)
    records.event("maintenance", f"{host} leaves maintenance: a placement target again",
                  host=host, detail={"ended": True})
    return True
