"""``vmdr replicate status`` and the dashboard's ``/replicas``: each replica's state, read
from the DR host (``replica.json`` and, for a continuous mirror, ``mirror.json``).

Per replica: mode (snapshot, mirror, sync), the newest restore point, the achieved RPO
against its target, an SLA state in Zerto's sense (:func:`.mirror_state.sla_state`; ``in-use``
while an HA copy or a failover runs on it, :mod:`.replica_guard`), and the bytes moved by
the last cycles.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmdr.config import Config
from vmdr.errors import UsageError, VmdrError
from vmdr.jobs.mirror_state import LABELS, MIRROR_FILE, STOPPED, MirrorState, sla_state
from vmdr.jobs.replica_guard import describe
from vmdr.jobs.replicate import load_state, redact_uri
from vmdr.jobs.replicate_site import Site, check_dir
from vmdr.jobs.replicate_state import ReplicaState
from vmdr.plan import inventory as invmod
from vmdr.timeutil import utcnow

DEFAULT_ROOT = "/var/lib/libvirt/images/vmdr-replicas"


@dataclass
class Where:
    uri: str
    root: str


def resolve_host(cfg: Config, to: str, root: str | None) -> Where:
    """A libvirt URI as it is; an inventory host name by its ``uri`` and ``target_dir``."""
    if "://" in to:
        return Where(to, check_dir(root or DEFAULT_ROOT))
    inv = invmod.from_config(cfg)
    host = inv.hosts.get(to)
    if host is None:
        known = ", ".join(sorted(inv.hosts)) or "none in [hosts]"
        raise UsageError(f"unknown DR host {to!r}: give a libvirt URI (qemu+ssh://HOST/system) "
                         f"or a host of the inventory ({known})")
    if not host.uri:
        raise UsageError(f"inventory host {to!r} has no uri")
    return Where(host.uri, check_dir(root or f"{host.target_dir.rstrip('/')}/vmdr-replicas"))


def load_mirror(site: Site, directory: str) -> MirrorState | None:
    path = f"{directory}/{MIRROR_FILE}"
    data = site.read(path)
    return None if data is None else MirrorState.from_json(data, f"{site.where}:{path}")


IN_USE = "in-use"  # an HA copy or a failover runs on the replica: no cycle writes it
IN_USE_LABEL = "In use: not replicated"


def in_use(site: Site, directory: str, vm: str) -> str | None:
    """"in use by the HA copy of VM on HOST since ..." (or a failover), None when free
    (one command at the DR host: :mod:`.replica_guard`)."""
    p = site.probe(directory)
    if p.clear:
        return None
    return describe(p, vm)


def row(st: ReplicaState | None, vm: str, target: str, error: str | None = None,
        rpo: float | None = None, ms: MirrorState | None = None,
        used: str | None = None) -> dict[str, Any]:
    """One replica's status (the ``--json`` row); ``used``: what runs on it (its SLA
    state is then ``in-use``: no cycle writes it, whatever its RPO)."""
    now = utcnow()
    if st is not None and rpo is not None:
        st.rpo_target_s = rpo
    target_s = st.rpo_target_s if st else rpo
    state, age = sla_state(st, ms, now, target_s)
    if error is not None:
        state = "unknown"
    elif used is not None:
        state = IN_USE
    mode = ms.mode if ms is not None and ms.state != STOPPED else "snapshot"
    out: dict[str, Any] = {"vm": vm, "target": target, "sla": state,
                           "sla_label": LABELS.get(state, state.capitalize()), "mode": mode,
                           "rpo_achieved_s": None if age is None else round(age, 1),
                           "rpo_target_s": target_s, "error": error, "in_use": used}
    if state == IN_USE:
        out["sla_label"] = IN_USE_LABEL
    if ms is not None:
        out["mirror"] = {"state": ms.state, "since": ms.since, "updated": ms.updated,
                         "in_sync_at": ms.in_sync_at, "bytes_mirrored": ms.bytes_mirrored,
                         "lag_bytes": ms.lag_bytes, "starts": ms.starts, "aborts": ms.aborts,
                         "error": ms.error, "supervisor": ms.supervisor}
    if st is not None:
        last = st.cycles[-1] if st.cycles else None
        out.update({
            "standby": st.standby, "standby_uuid": st.standby_uuid, "feed": st.feed,
            "directory": st.directory,
            "newest_point": st.newest.name if st.newest else None,
            "newest_point_time": st.newest.time if st.newest else None,
            "points": [p.name for p in st.points], "keep": st.keep,
            "writing": st.writing,
            "last_cycle": None if last is None else {
                "started": last.started, "mode": last.mode, "bytes_moved": last.bytes_moved,
                "duration_s": last.duration_s, "error": last.error},
            "bytes_moved_per_cycle": [c.bytes_moved for c in st.cycles[-10:]],
        })
    return out


def collect(cfg: Config, vms: list[str], to: str | None, directory: str | None,
            extra: Iterable[tuple[str, str, float | None]] = ()) -> list[dict[str, Any]]:
    """The rows of ``vmdr replicate status``: with ``to``, the named VMs there (all the
    replicas found under the root when none is named; an unreachable DR host is then an
    error); without, the inventory's replicas (``vms`` or all), plus ``extra``
    ``(vm, to, rpo)`` (the agent's replicate policies)."""
    decls = invmod.replica_decls(cfg)
    wanted: list[tuple[str, Where, float | None]] = []
    if to:
        where = resolve_host(cfg, to, directory)
        wanted += [(vm, where, decls[vm].rpo_s if vm in decls else None) for vm in vms]
    else:
        for vm in vms or sorted(decls):
            d = decls.get(vm)
            if d is None:
                raise UsageError(f"{vm}: not a replica of the inventory; add --to HOST")
            wanted.append((vm, resolve_host(cfg, d.to, directory or d.directory), d.rpo_s))
        for vm, dest, rpo in extra:
            if vm not in decls:
                wanted.append((vm, resolve_host(cfg, dest, directory), rpo))
    scan = bool(to) and not vms
    sites: dict[str, list[tuple[str, Where, float | None]]] = {}
    for item in wanted:
        sites.setdefault(item[1].uri, []).append(item)
    scan_root = resolve_host(cfg, to, directory) if scan and to else None
    if scan_root is not None:
        sites.setdefault(scan_root.uri, [])
    rows: list[dict[str, Any]] = []
    for uri, items in sites.items():
        shown = redact_uri(uri)
        try:
            with Site(uri) as site:
                if scan_root is not None and uri == scan_root.uri:
                    for f in site.state_files(scan_root.root):
                        sdir = f.rsplit("/", 1)[0]
                        st = load_state(site, sdir)
                        if st is not None:
                            rows.append(row(st, st.vm, shown, ms=load_mirror(site, sdir),
                                            used=in_use(site, sdir, st.vm)))
                for vm, w, rpo in items:
                    st = load_state(site, f"{w.root}/{vm}")
                    used = in_use(site, f"{w.root}/{vm}", vm) if st else None
                    rows.append(row(st, vm, shown, None if st else "no replica at the target",
                                    rpo, load_mirror(site, f"{w.root}/{vm}"), used))
        except VmdrError as exc:
            if scan and not items:
                # nothing named to report on: the error is the answer (never a silent 0)
                raise type(exc)(f"replica status of {shown}: {exc.message}") from None
            for vm, _w, _r in items:
                rows.append(row(None, vm, shown, exc.message))
    return rows
