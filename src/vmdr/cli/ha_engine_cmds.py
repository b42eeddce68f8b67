"""``vmdr ha status | events``: the live HA state of the fleet, from its etcd.

``status``: hosts (lease live or not, leader, capacity, maintenance), the HA VMs with the
host each runs on and where each would go if that host failed now, N+1 headroom
(admission control on live data), in-flight failovers. ``events``: every HA decision with
its reason (detected, fenced, self-fenced, placed, started, ready, gave-up, ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from vmdr.agent.ha_restore import preview_line
from vmdr.cli.common import Globals, emit_json, out
from vmdr.config import Config, parse_duration
from vmdr.errors import UsageError
from vmdr.ha import admission
from vmdr.ha.failover import failover_plan
from vmdr.ha.leader import domain_size
from vmdr.ha.model import ClusterState, HAPolicy, HostState, VMState, load_policy
from vmdr.ha.noshared import with_replica_affinity
from vmdr.ha.store import HAStore
from vmdr.plan import inventory
from vmdr.plan.units import fmt_size
from vmdr.timeutil import parse_time, utcnow

__all__ = ["register_engine"]


def _open(cfg: Config, what: str) -> tuple[Any, HAStore]:
    if not cfg.agent.etcd:
        raise UsageError(f"{what} needs the fleet's etcd: set [agent] etcd = "
                         "[\"http://HOST:2379\", ...] in the config")
    from vmdr.agent.coord_etcd import EtcdCoordinator  # the fleet's etcd client

    coord = EtcdCoordinator(cfg.agent.etcd, 10.0, cfg.agent.etcd_prefix)
    return coord, HAStore.for_coordinator(coord, me="cli")


def etcd_error(cfg: Config, exc: Exception) -> UsageError:
    """One line for an etcd that fails (etcd3gw's connection errors have no text)."""
    from vmdr.storage.registry import redact

    where = ", ".join(redact(e) for e in cfg.agent.etcd)
    return UsageError(f"etcd ({where}): {str(exc) or type(exc).__name__}")


def _fmt_t(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def status_data(policy: HAPolicy, inv_hosts: list[str], members: list[Any],
                leader: str | None, store: HAStore) -> dict[str, Any]:
    """Everything ``ha status`` shows, as data (the JSON form)."""
    maint = store.maintenance()
    wheres = store.wheres()
    live = {m.host: m for m in members}
    hosts: dict[str, HostState] = {}
    for name in sorted(set(inv_hosts) | set(live)):
        m = live.get(name)
        hosts[name] = HostState(name, m.cpus if m else None,
                                (m.memory_mib << 20) if m else None, up=m is not None,
                                maintenance=name in maint,
                                libvirt=m is None or m.libvirt_ok)
    sizes: dict[str, tuple[int, int]] = {}
    for vm in policy.vms:
        xml = store.domain(vm)
        sizes[vm] = domain_size(xml) if xml else (0, 0)
    vms: dict[str, VMState] = {}
    for m in members:
        for vm in m.running_vms:
            vms[vm] = VMState(vm, m.host, *sizes.get(vm, (0, 0)))
    for vm in policy.vms:
        if vm not in vms:
            vms[vm] = VMState(vm, wheres.get(vm), *sizes[vm], running=False)
    state = ClusterState(hosts, vms)
    would: dict[str, str | None] = {}
    for host in sorted({v.host for v in vms.values() if v.host and v.running}):
        plan = failover_plan(with_replica_affinity(policy), state, {host})
        for st in plan.starts:
            would[st.vm] = st.host
        for vm in plan.placement.unplaced:
            would[vm] = None
    adm = admission.check(policy, state)
    tests = store.tests()
    return {
        "leader": leader,
        "hosts": [{"host": h.name, "lease": h.up, "leader": h.name == leader,
                   "vcpus": h.vcpus, "memory": h.memory, "maintenance": maint.get(h.name),
                   "libvirt": _libvirt(live.get(h.name)),
                   "running": sorted(live[h.name].running_vms) if h.name in live else []}
                  for h in hosts.values()],
        "vms": [{"vm": vm, "host": vms[vm].host if vms[vm].running else None,
                 "last_host": wheres.get(vm), "running": vms[vm].running,
                 "priority": policy.vms[vm].priority,
                 "would_go_to": would.get(vm), "last_failover": tests.get(vm)}
                for vm in sorted(policy.vms)],
        "headroom": {"host_failures_tolerated": adm.required, "ok": adm.ok,
                     "worst_failure": list(adm.worst.failed) if adm.worst else None,
                     "worst_spare_memory": adm.worst.spare_memory if adm.worst else None,
                     "problems": adm.problems()},
        "failovers": store.failovers(),
    }


def _libvirt(m: Any) -> dict[str, Any] | None:
    """A live host's libvirt as its agent reports it (None: no live agent)."""
    if m is None:
        return None
    if m.libvirt_ok:
        return {"ok": True}
    return {"ok": False, "since": m.libvirt_down or None, "error": m.libvirt_error}


def _restores(cfg: Config, inv: inventory.Inventory, policy: HAPolicy,
              d: dict[str, Any]) -> None:
    """Each HA VM without shared storage gets ``restore``: the restore point it would
    start from if its host failed now (vmdr.agent.ha_restore.preview)."""
    from vmdr.agent.ha_restore import preview

    targets = {v["vm"]: v["would_go_to"] for v in d["vms"] if policy.vms[v["vm"]].local}
    if not targets:
        return
    rows = {r["vm"]: r for r in preview(cfg, inv, policy, targets, utcnow().timestamp())}
    for v in d["vms"]:
        if v["vm"] in rows:
            v["restore"] = rows[v["vm"]]


def cmd_status(ns: argparse.Namespace, g: Globals) -> int:
    inv = inventory.from_config(g.config)
    policy = load_policy(inv)
    coord, store = _open(g.config, "vmdr ha status")
    try:
        members = coord.read_members()
        raw = coord._call(lambda c: c.get(f"{coord.prefix}leader"))
    except UsageError:
        raise
    except Exception as exc:
        raise etcd_error(g.config, exc) from None
    leader = (raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])) if raw else None
    d = status_data(policy, list(inv.hosts), members, leader, store)
    _restores(g.config, inv, policy, d)
    if g.json:
        emit_json(d)
        return 0 if d["headroom"]["ok"] else 1
    out(f"leader: {leader or 'none'}")
    out("hosts:")
    for h in d["hosts"]:
        lv = h["libvirt"]
        flags = [x for x, on in (("leader", h["leader"]),
                                 ("maintenance", h["maintenance"])) if on]
        if lv and not lv["ok"]:
            flags.append(f"libvirt DOWN since {_fmt_t(lv.get('since'))}: no failover target")
        cap = f"{h['vcpus']} vCPU, {fmt_size(h['memory'])}" if h["memory"] else "-"
        out(f"  {h['host']:<12} lease {'live' if h['lease'] else 'GONE':<5} {cap:<22} "
            f"{len(h['running'])} running{'  [' + ', '.join(flags) + ']' if flags else ''}")
    out("HA VMs:")
    for v in d["vms"]:
        to = v["would_go_to"] or ("cannot be placed" if v["running"] else "-")
        out(f"  {v['vm']:<20} on {v['host'] or 'nowhere (last: ' + str(v['last_host']) + ')'}"
            f"  → if its host fails: {to}  (priority {v['priority']})")
        if v.get("restore"):
            out("  " + preview_line(v["restore"]))
    hd = d["headroom"]
    if hd["ok"]:
        spare = f", worst case {', '.join(hd['worst_failure'] or [])} leaves " \
                f"{fmt_size(hd['worst_spare_memory'] or 0)} spare" if hd["worst_failure"] \
            else ""
        out(f"headroom: ok, {hd['host_failures_tolerated']} host failure(s) absorbed{spare}")
    else:
        out(f"headroom: NOT ok for {hd['host_failures_tolerated']} host failure(s):")
        for p in hd["problems"]:
            out(f"  {p}")
    for host, rec in sorted(d["failovers"].items()):
        state = "done" if rec.get("done") else "in flight"
        out(f"failover of {host}: {state}, detected {_fmt_t(rec.get('detected'))}, "
            f"{len(rec.get('started', {}))} started, {len(rec.get('ready', {}))} ready")
    return 0 if hd["ok"] else 1


def _since(text: str | None) -> float | None:
    if not text:
        return None
    d = parse_duration(text)
    if d is not None:
        return utcnow().timestamp() - d
    try:
        return parse_time(text).timestamp()
    except ValueError:
        raise UsageError(f"--since: expected a duration (30m, 2h, 1d) or an ISO time, "
                         f"got {text!r}") from None


def cmd_events(ns: argparse.Namespace, g: Globals) -> int:
    since = _since(ns.since)
    if ns.limit is not None and ns.limit < 1:
        raise UsageError(f"--limit: expected a number of events of at least 1, got "
                         f"{ns.limit}")
    _coord, store = _open(g.config, "vmdr ha events")
    try:
        evs = store.events(since=since, vm=ns.vm, limit=ns.limit)
    except Exception as exc:
        raise etcd_error(g.config, exc) from None
    if g.json:
        emit_json([e.as_dict() for e in evs])
        return 0
    for e in evs:
        who = " ".join(x for x in (e.host and f"host={e.host}", e.vm and f"vm={e.vm}") if x)
        out(f"{_fmt_t(e.time)}  {e.kind:<11} {who}  {e.reason}")
    if not evs:
        out("no HA events" + (" in that window" if since else ""))
    return 0


def register_engine(psub: argparse._SubParsersAction,  # type: ignore[type-arg]
                    parents: list[argparse.ArgumentParser]) -> None:
    """``ha status`` and ``ha events`` (called from ha_cmds.register)."""
    q = psub.add_parser(
        "status", parents=parents, help="live HA state: hosts, leases, leader, HA VMs and "
                                        "where each would go, N+1 headroom",
        description="Read the fleet's etcd ([agent] etcd): every host with its lease, the "
                    "leader, capacity, maintenance flag and libvirt health (a host whose "
                    "libvirt does not answer is alive but no failover target); every HA "
                    "VM with the host it runs on and where it would restart if that host "
                    "failed now; N+1 headroom (admission control on live data); in-flight "
                    "failovers.",
        epilog="exit codes: 0 ok, 1 the cluster cannot absorb host_failures_tolerated "
               "failures, 2 bad config or etcd unreachable")
    q.set_defaults(func=cmd_status)
    q = psub.add_parser(
        "events", parents=parents, help="HA decisions with their reasons",
        description="Every HA decision the agents recorded in etcd, oldest first: "
                    "detected, fenced, self-fenced, placed, started, ready, gave-up, "
                    "restored, migrated, maintenance, tested.",
        epilog="exit codes: 0 ok, 2 bad arguments or etcd unreachable")
    q.add_argument("--since", metavar="WHEN", help="a duration back from now (30m, 2h) or "
                                                   "an ISO 8601 time")
    q.add_argument("--vm", help="only this VM's events")
    q.add_argument("--limit", type=int, default=None, help="only the newest N")
    q.set_defaults(func=cmd_events)
