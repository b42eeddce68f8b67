"""The dashboard's ``/replicas``: every standby replica and continuous mirror, as
``vmdr replicate status`` shows them (read from the DR hosts, cached a few seconds).

Replicas are the inventory's (``[replicas]``, ``replica_to``) and those of the agent's
``kind = "replicate"`` policies that name a DR host (``to``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from vmdr.agent import scheduler as sched
from vmdr.agent.daemon import Agent
from vmdr.agent.web import _need, page
from vmdr.errors import VmdrError
from vmdr.jobs.replica_status import collect
from vmdr.plan import inventory as invmod

CACHE_S = 10.0
_cache: dict[int, tuple[float, list[dict[str, Any]], str | None]] = {}
_lock = threading.Lock()

SLA_CLASS = {"meeting-sla": "good", "not-meeting-sla": "bad", "error": "bad", "paused": "",
             "initializing": "", "unknown": "bad", "no-rpo-target": "",
             "in-use": "bad"}


def policy_replicas(a: Agent) -> list[tuple[str, str, float | None]]:
    """(vm, DR host, RPO target) of the replicate policies that name a DR host."""
    out = []
    vms = a.all_vms()
    for _, p in sorted(a.cfg.policies.items()):
        if p.kind != "replicate" or not p.to:
            continue
        out += [(v.name, p.to, p.rpo_s) for v in vms if sched.covered(p, v)]
    return out


def replica_rows(a: Agent) -> tuple[list[dict[str, Any]], str | None]:
    """The status rows (and an error that stopped gathering them), cached CACHE_S."""
    with _lock:
        hit = _cache.get(id(a))
        if hit is not None and time.monotonic() - hit[0] < CACHE_S:
            return hit[1], hit[2]
        try:
            rows, err = collect(a.cfg, [], None, None, policy_replicas(a)), None
        except VmdrError as exc:
            rows, err = [], exc.message
        _cache[id(a)] = (time.monotonic(), rows, err)
        return rows, err


def check_replicas(a: Agent) -> None:
    """Every minute (the daemon's minutely pass): an ``rpo_breach`` alert per replica
    whose SLA state is RPO Not Meeting SLA, Error or in use (an HA copy or a failover runs
    on it: nothing replicates until it is released), resolved when it meets it again.
    Nothing is read when no replica is declared."""
    if not (invmod.replica_decls(a.cfg) or policy_replicas(a)):
        return
    with _lock:
        _cache.pop(id(a), None)
    rows, err = replica_rows(a)
    if err:
        a.alerter.fire("replica:status", "rpo_breach", f"replica status unreadable: {err}")
        return
    a.alerter.resolve("replica:status", "replica status readable again")
    for r in rows:
        key = f"replica-rpo:{r['vm']}"
        if r["sla"] in ("not-meeting-sla", "error", "unknown", "in-use"):
            why = (r.get("error") or r.get("in_use")
                   or (r.get("mirror") or {}).get("error") or "")
            a.alerter.fire(key, "rpo_breach", f"replica of {r['vm']}: {r['sla_label']} "
                           f"(achieved RPO {r['rpo_achieved_s']} s, target "
                           f"{r['rpo_target_s']} s){': ' + why if why else ''}")
        elif r["sla"] == "meeting-sla":
            a.alerter.resolve(key, f"replica of {r['vm']}: meeting its SLA again")


async def replicas_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    rows, err = await asyncio.to_thread(replica_rows, a)
    return page(request, "replicas.html", rows=rows, err=err, cls=SLA_CLASS)


routes = [Route("/replicas", replicas_page)]
