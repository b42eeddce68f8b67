"""The dashboard's HA page (``/ha``) and its JSON (``GET /api/v1/ha``, auditor role).

Hosts with their lease (a live ``members/<host>`` key), the leader and maintenance; the
HA VMs with their current host, where each would fail over to now and its last passed
failover; N+1 headroom (admission control on the live cluster); the newest HA events.
Everything is read from etcd through :class:`vmdr.ha.records.HARecords` over the agent's
own coordinator; a single-host agent (no ``[agent] etcd``) says that HA needs a fleet.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vmdr.agent import api
from vmdr.agent.daemon import Agent
from vmdr.agent.web import _need, page
from vmdr.errors import VmdrError
from vmdr.ha import admission
from vmdr.ha.failover import failover_plan
from vmdr.ha.fleet import state_from_members
from vmdr.ha.model import load_policy
from vmdr.ha.records import HARecords
from vmdr.ha.store import HAStore
from vmdr.plan import inventory

NO_FLEET = "HA needs a fleet (etcd): set [agent] etcd = [\"http://HOST:2379\", ...] on " \
           "every host's agent"


def _records(a: Agent) -> HARecords | None:
    if not a.cfg.agent.etcd or not hasattr(a.coord, "_call"):
        return None
    return HARecords(HAStore.for_coordinator(a.coord, me=a.host))  # type: ignore[arg-type]


def ha_status(a: Agent) -> dict[str, Any]:
    """The HA state of the fleet as JSON-able data."""
    records = _records(a)
    if records is None:
        return {"fleet": False, "message": NO_FLEET}
    inv = inventory.from_config(a.cfg)
    try:
        policy = load_policy(inv)
    except VmdrError as exc:
        return {"fleet": True, "error": f"the HA policy is invalid: {exc.message}"}
    try:
        state, notes = state_from_members(inv, records)
        members = records.members()
        maint = records.maintenance()
        where = records.where()
        tests = records.tests()
        events = records.events(limit=50)
        leader = records.leader()
    except Exception as exc:  # etcd unreachable from here
        return {"fleet": True, "error": f"etcd not reachable: {exc}"}
    hosts = []
    for name in sorted(set(inv.hosts) | set(members)):
        m = members.get(name) or {}
        h = state.hosts.get(name)
        mt = maint.get(name)
        hosts.append({
            "host": name, "lease": bool(m), "leader": name == leader,
            "maintenance": mt is not None, "maintenance_since": (mt or {}).get("since"),
            "maintenance_reason": (mt or {}).get("reason"),
            "vcpus": h.vcpus if h else m.get("cpus"),
            "memory": h.memory if h else None, "seen": m.get("seen"),
            "running": len(m.get("running_vms") or []), "in_inventory": name in inv.hosts})
    vms = []
    for name in sorted(policy.vms):
        v = state.vms.get(name)
        current = where.get(name) or (v.host if v and v.running else None)
        target, why = None, None
        if current:
            plan = failover_plan(policy, state, {current})
            target = plan.placement.placed.get(name)
            why = plan.placement.unplaced.get(name)
        t = tests.get(name)
        vms.append({"vm": name, "host": current, "running": bool(v and v.running),
                    "failover_to": target, "unplaced": why,
                    "last_test": t.to_json() if t else None})
    adm = admission.check(policy, state)
    return {
        "fleet": True, "leader": leader, "hosts": hosts, "vms": vms,
        "headroom": {"host_failures_tolerated": adm.required, "ok": adm.ok,
                     "worst_failure": list(adm.worst.failed) if adm.worst else None,
                     "worst_spare_memory": adm.worst.spare_memory if adm.worst else None,
                     "problems": adm.problems()},
        "events": list(reversed(events)), "notes": notes,
    }


def ha_page(request: Request) -> Response:
    _need(request, "auditor")
    return page(request, "ha.html", ha=ha_status(request.app.state.agent))


def ha_api(request: Request) -> Response:
    api.need(request, "auditor")
    return JSONResponse(ha_status(request.app.state.agent))


routes = [
    Route("/ha", ha_page),
    Route("/api/v1/ha", ha_api),
]
