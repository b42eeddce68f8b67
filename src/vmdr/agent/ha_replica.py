"""HA without shared storage, first choice: the VM's hot-site replica on this host.

A VM with ``ha_storage = "local"`` and ``replica_to = "<inventory host>"`` that the leader
places on that host (placement prefers it: :func:`vmdr.ha.noshared.with_replica_affinity`)
starts from the replica's newest restore point, the way ``vmdr failover`` (unplanned)
brings one VM up: the replica found and checked by :func:`vmdr.jobs.failover_site.load_vm`,
the point by :func:`~vmdr.jobs.failover_site.choose_point`, the standby's disks set to it
by :func:`~vmdr.jobs.failover_site.revert`, and qcow2 overlays over them made by the same
script as a failover's (so the replica's disks stay as they were). The copy is defined
under the VM's **own name** (new UUID, the standby's MACs and DR networks), so the guard's
self-fencing, the leader's "is it running anywhere?" check and the readiness check see it
as the VM itself. The standby domain stays defined and stopped; the replica is marked in
use first (``ha-inuse.json``, :mod:`vmdr.jobs.replica_guard`) so no replica cycle,
failover or revert touches the disks under the copy until ``vmdr replicate release``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from vmdr.config import Config
from vmdr.errors import VmdrError
from vmdr.ha.noshared import RestorePoint
from vmdr.plan.inventory import Inventory

__all__ = ["HA_OVERLAY_DIR", "ReplicaUnusable", "newest_point", "replica_plan_vm",
           "start_from_replica"]

HA_OVERLAY_DIR = "ha"  # <replica dir>/ha/<disk>.qcow2: the HA copy's overlays


class ReplicaUnusable(Exception):
    """Why the replica cannot be used here (the executor falls back to the backup)."""


def replica_plan_vm(cfg: Config, inv: Inventory, vm: str, host: str,
                    uri: str | None = None) -> Any:
    """The :class:`vmdr.plan.recovery.PlanVM` of *vm*'s replica on *host*, reached through
    *uri* (default: the agent's own ``connect``: the replica is on this host)."""
    from vmdr.plan.recovery import PlanVM

    decl = inv.replicas.get(vm)
    h = inv.hosts.get(host)
    if decl is None or decl.to != host or h is None:
        raise ReplicaUnusable(f"no replica of {vm} declared on {host}")
    root = decl.directory or f"{h.target_dir.rstrip('/')}/vmdr-replicas"
    return PlanVM(vm, uri or cfg.connect, host, f"{root}/{vm}", decl.standby or f"{vm}-replica",
                  None, None, decl.network_map)


def newest_point(cfg: Config, inv: Inventory, vm: str, host: str,
                 uri: str | None = None) -> RestorePoint:
    """The newest restore point of the replica on *host* (ReplicaUnusable: none,
    unreadable, no standby)."""
    from vmdr.jobs import failover_site as fs

    pv = replica_plan_vm(cfg, inv, vm, host, uri)
    try:
        with fs.Sites() as sites:
            d = fs.load_vm(sites, pv)
            p = fs.choose_point(d.state, None)
    except VmdrError as exc:
        raise ReplicaUnusable(exc.message) from None
    return RestorePoint("replica", p.name, dt.datetime.fromisoformat(p.time).timestamp(),
                        host)


def start_from_replica(cfg: Config, inv: Inventory, vm: str, host: str,
                       point: str) -> None:
    """Set the replica to *point*, put overlays over its disks and start the VM on them
    under its own name (raises VmdrError on failure; nothing runs then).

    The marker ``ha-inuse.json`` goes into the replica's directory BEFORE the standby's
    disks are touched: from then on no replica cycle, failover or revert touches them
    (:mod:`vmdr.jobs.replica_guard`). A start that fails takes it away again, with the
    overlays and the definition, when nothing runs on them."""
    from vmdr.hypervisor import rewrite_domain_xml
    from vmdr.jobs import failover_site as fs
    from vmdr.jobs import replica_guard
    from vmdr.jobs.failover import _FAILOVER_OVERLAY

    pv = replica_plan_vm(cfg, inv, vm, host)
    with fs.Sites() as sites:
        d = fs.load_vm(sites, pv)  # ReplicaInUse (exit 13) if an HA copy still uses it
        p = next((x for x in d.state.points if x.name == point), None)
        if p is None:
            raise ReplicaUnusable(f"restore point {point} of {vm}'s replica is gone")
        o = f"{pv.directory}/{HA_OVERLAY_DIR}"
        pairs: list[str] = []
        paths: dict[str, str] = {}
        for t, disk in sorted(d.state.disks.items()):
            paths[t] = f"{o}/{t}.qcow2"
            pairs += [str(disk["path"]), paths[t]]
        d.site.mark_in_use(pv.directory, replica_guard.marker(vm, host, sorted(paths.values()),
                                                              point))
        started = False
        try:
            fs.revert(d, p)
            d.site.run(_FAILOVER_OVERLAY, o, *pairs)
            xml = rewrite_domain_xml(d.standby.xml(inactive=True), new_name=vm,
                                     new_uuid=True, new_macs=False,
                                     disk_paths={t: (x, "qcow2") for t, x in paths.items()})
            d.hv.define(xml)
            d.hv.lookup(vm).start()
            started = True
        finally:
            if not started:
                _undo(d, vm, pv.directory)


def _undo(d: Any, vm: str, directory: str) -> None:
    """After a failed start: the copy's definition, overlays and marker go, unless
    something runs on them (then the marker stays and guards them)."""
    from vmdr.jobs import replica_guard

    try:
        users = replica_guard.users(d.hv, directory)
        if any(active for _n, active in users):
            return
        for name, _a in users:
            d.hv.lookup(name).undefine()
        replica_guard.release(d.site, d.hv, directory, vm)
    except VmdrError:
        pass  # the marker stays: the next cycle refuses, `vmdr replicate release` clears
