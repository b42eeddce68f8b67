"""A replica that something runs on is never written, reverted or rotated.

An HA restart from a replica (:mod:`vmdr.agent.ha_replica`) and a failover
(:mod:`vmdr.jobs.failover`) run a VM on qcow2 overlays over the standby's disks: those
disks are then the **backing files** of a VM's disks. A replica cycle that wrote new
data into them, took or deleted restore points in them, or a revert to another point,
would change what the overlays sit on: the VM's filesystems would be corrupt. QEMU's
image locks refuse that only while the VM's QEMU runs; after a shutdown, a self-fence or
a crash of the HA copy, nothing would. So, at the DR host, where the disks are:

* the HA start writes ``<replica dir>/ha-inuse.json`` (the VM, the host, since when, the
  overlays) **before** it reverts the standby's disks; a failover writes
  ``failover.json``;
* the first remote command of every cycle (the begin script that also reads the test
  failovers' pins, :data:`.replica_scripts._GUARD`: no extra round trip) reports the
  marker, a failover's record and the overlays under ``ha/`` and ``failover/``, each
  ``busy`` when a process holds it open (``qemu-img info`` without ``-U`` fails on
  QEMU's image lock);
* :func:`check` then refuses: :class:`~vmdr.errors.ReplicaInUse`, exit 13, one line.
  ``vmdr failover`` / test failover / failback and HA's own next restore refuse an HA
  copy's replica the same way (:func:`vmdr.jobs.failover_site.load_vm`).

A marker is **stale** when it is over 10 minutes old (by the DR host's clock: an HA start
takes seconds, and its marker is there before its overlays), no overlay is left under
``ha/`` and no domain at the DR host (running or only defined) has a disk there, e.g.
the HA start died before it made them: the cycle clears it and goes on, with a warning.
Overlays are never removed automatically, even when no domain uses them any more: they
may hold the only copy of what the VM wrote since its restart. ``vmdr replicate release
VM`` (:func:`release`) removes them once the VM is home, and only when nothing uses them.
"""

from __future__ import annotations

import json
from typing import Any

from vmdr.errors import ReplicaInUse, UsageError, VmdrError
from vmdr.hypervisor import Hypervisor, parse_xml
from vmdr.jobs.replica_scripts import Probe
from vmdr.jobs.replicate_site import Site
from vmdr.timeutil import utcnow

__all__ = ["HA_DIR", "MARKER", "check", "describe", "marker", "release", "users"]

MARKER = "ha-inuse.json"
HA_DIR = "ha"  # <replica dir>/ha/<disk>.qcow2: the HA copy's overlays
FAILOVER_DIR = "failover"

_RELEASE = r"""d=$1
rm -f -- "$d/ha-inuse.json" "$d/ha-inuse.json.tmp"
rm -rf -- "$d/ha"
[ ! -e "$d/ha" ] && [ ! -e "$d/ha-inuse.json" ]
"""


def marker(vm: str, host: str, overlays: list[str], point: str) -> bytes:
    """The content of ``ha-inuse.json`` (one line: the begin script passes it on as is)."""
    return json.dumps({"kind": "ha", "vm": vm, "host": host, "domain": vm,
                       "since": utcnow().isoformat(timespec="seconds"), "point": point,
                       "overlays": overlays}, separators=(",", ":")).encode()


def users(hv: Hypervisor | None, directory: str, sub: str = HA_DIR) -> list[tuple[str, bool]]:
    """The domains at the DR host (name, running) with a disk under ``directory/sub/``."""
    if hv is None:
        return []
    prefix = f"{directory.rstrip('/')}/{sub}/"
    out = []
    for name in hv.list_domains():
        try:
            dom = hv.lookup(name)
            active = dom.is_active()
            xmls = [dom.xml(inactive=True)] + ([dom.xml()] if active else [])
        except VmdrError:
            continue  # undefined meanwhile
        for x in xmls:
            try:
                root = parse_xml(x)
            except (ValueError, SyntaxError):
                continue
            if any((s.get("file") or "").startswith(prefix)
                   for s in root.iterfind("./devices/disk/source")):
                out.append((name, active))
                break
    return out


def describe(p: Probe, vm: str) -> str:
    """What uses the replica, for people: "in use by the HA copy of VM on HOST since T
    (running)" (the status page and every refusal)."""
    m = p.marker or {}
    running = "running" if p.busy else "not running: its overlays hold its data"
    if m or p.marker_bad or any(f"/{HA_DIR}/" in o for o in p.overlays + p.busy):
        who = f"the HA copy of {m.get('vm') or vm}"
        if m.get("host"):
            who += f" on {m['host']}"
        if m.get("since"):
            who += f" since {m['since']}"
        return f"in use by {who} ({running})"
    return f"in use by a failover of {vm} at the DR site ({running})"


def check(site: Site, target: Hypervisor | None, directory: str, vm: str, *,
          what: str = "a replica cycle", failover_ok: bool = False) -> list[str]:
    """Refuse (ReplicaInUse, exit 13) when a VM runs, or has its data, on overlays over
    the standby's disks in ``directory``; the warnings to report (a stale marker
    cleared). ``failover_ok``: a failover's overlays do not count (failback's and a
    failover's own handling of their record)."""
    p = site.probe(directory)
    ha_over = [o for o in p.overlays + p.busy if f"/{FAILOVER_DIR}/" not in o]
    fo_over = [o for o in p.overlays + p.busy if f"/{FAILOVER_DIR}/" in o]
    failover = (p.failed_over or bool(fo_over)) and not failover_ok
    if not (p.marker is not None or p.marker_bad or ha_over or failover):
        return []
    if (p.marker is not None or p.marker_bad) and p.marker_aged and not ha_over \
            and not failover and not users(target, directory):
        site.run(_RELEASE, directory)
        who = (p.marker or {}).get("host") or "an unknown host"
        return [f"cleared a stale HA marker in {directory} (from {who}; no overlay and no "
                "domain uses the replica any more)"]
    if ha_over or p.marker is not None or p.marker_bad:
        p = Probe(p.marker, p.marker_bad, p.marker_aged, False,
                  [o for o in p.overlays if o in ha_over], [o for o in p.busy if o in ha_over])
        how = ("bring it home first (docs/operations.md, 'After an HA restart from a "
               f"replica'), then `vmdr replicate release {vm}`")
    else:
        p = Probe(None, False, False, True, [o for o in p.overlays if o in fo_over],
                  [o for o in p.busy if o in fo_over])
        how = "fail back first (`vmdr failback PLAN`)"
    raise ReplicaInUse(f"{vm}: the replica in {directory} on {site.where} is "
                       f"{describe(p, vm)}: {what} never writes, reverts or rotates it; "
                       f"{how}")


def release(site: Site, target: Hypervisor | None, directory: str, vm: str) -> dict[str, Any]:
    """``vmdr replicate release VM``: remove the HA copy's overlays and marker once the VM
    is home. Refused (ReplicaInUse) while a process holds an overlay or a domain at the
    DR host still has a disk on one; UsageError when there is nothing to release."""
    p = site.probe(directory)
    ha = [o for o in p.overlays + p.busy if f"/{FAILOVER_DIR}/" not in o]
    if p.marker is None and not p.marker_bad and not ha:
        raise UsageError(f"{vm}: the replica in {directory} on {site.where} is not in use by "
                         "an HA copy: nothing to release")
    busy = [o for o in p.busy if o in ha]
    doms = users(target, directory)
    if busy or doms:
        names = ", ".join(f"{n} ({'running' if a else 'defined'})" for n, a in doms)
        raise ReplicaInUse(f"{vm}: the replica in {directory} on {site.where} is still "
                           f"{describe(p, vm)}" + (f"; domain(s) on it: {names}" if names
                                                   else "") +
                           ": move the VM home and undefine the copy there first")
    site.run(_RELEASE, directory)
    return {"vm": vm, "directory": directory, "removed": ha, "marker": p.marker}
