"""The REST API under ``/api/v1`` (Starlette). Its contract is ``openapi.py``.

Reads need ``auditor``; starting backups, verifications, copies and restores to a new name
need ``operator``; restores in place need ``admin``. Handlers that read the history are plain
functions, which Starlette runs on its thread pool, so a slow query never stalls the event
loop that also runs the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vmdr.agent.auth import Principal
from vmdr.agent.daemon import Agent
from vmdr.agent.history import Job
from vmdr.agent.openapi import document
from vmdr.agent.views import (
    plan_coverage,
    repositories,
    snapshots,
)
from vmdr.storage.registry import redact

log = logging.getLogger("vmdr.agent")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}$")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def agent_of(request: Request) -> Agent:
    a: Agent = request.app.state.agent
    return a


def need(request: Request, role: str) -> Principal:
    p: Principal | None = getattr(request.state, "principal", None)
    if p is None:
        raise ApiError(401, "authentication required: Authorization: Bearer <token>")
    if not p.can(role):
        raise ApiError(403, f"the {p.role} role may not do this (needs {role})")
    return p


def _vm(request: Request) -> str:
    name = str(request.path_params["name"])
    if not _NAME.match(name):
        raise ApiError(404, "no such VM")
    return name


def _int(request: Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ApiError(400, f"{key} must be an integer {lo}..{hi}")
    return int(raw)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def health(request: Request) -> JSONResponse:
    a = agent_of(request)
    return JSONResponse({"status": "ok", "host": a.host, "leader": a.leader,
                         "coordination": a.coord.name, "scheduling_note": a.scheduling_note})


SHARED_TTL = 1.0  # seconds a listing of a history other agents also write is served again


class Listings:
    """Encoded JSON of the hot listings (the jobs page, the protection table), asked for
    by every dashboard and monitor: served again while the history's version is unchanged
    (a job queued, started or ended bumps it) and, in a fleet, for at most SHARED_TTL
    seconds. A hit is answered on the event loop, with no thread hop and no query."""

    MAX = 256
    WORKERS = 4  # misses computed at once: more only contend for the GIL, and lose order

    def __init__(self) -> None:
        self._d: dict[tuple[Any, ...], tuple[int, float, Any, bytes]] = {}
        self.gate = asyncio.Semaphore(self.WORKERS)

    def get(self, a: Agent, key: tuple[Any, ...], tag: Any = None) -> bytes | None:
        hit = self._d.get(key)
        if hit is None or hit[0] != a.history.version or hit[2] is not tag:
            return None
        if a.history.shared and time.monotonic() - hit[1] > SHARED_TTL:
            return None
        return hit[3]

    def put(self, key: tuple[Any, ...], version: int, body: bytes, tag: Any = None) -> None:
        if len(self._d) >= self.MAX:
            self._d.clear()
        self._d[key] = (version, time.monotonic(), tag, body)


_listings: weakref.WeakKeyDictionary[Agent, Listings] = weakref.WeakKeyDictionary()


def listings(a: Agent) -> Listings:
    c = _listings.get(a)
    if c is None:
        c = _listings[a] = Listings()
    return c


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


async def list_vms(request: Request) -> Response:
    """The protection table (thousands of rows in a fleet), encoded once per computed
    table; computed on a worker thread when the agent's copy is stale."""
    need(request, "auditor")
    a = agent_of(request)
    rows = a.protection_fresh()
    if rows is None:
        rows = await asyncio.to_thread(a.protection)
    cache = listings(a)
    body = cache.get(a, ("vms",), rows)
    if body is None:
        version = a.history.version
        body = await asyncio.to_thread(_dumps, {"vms": rows})
        cache.put(("vms",), version, body, rows)
    return Response(body, media_type="application/json")


def get_vm(request: Request) -> JSONResponse:
    need(request, "auditor")
    a, name = agent_of(request), _vm(request)
    row = next((p for p in a.protection() if p["name"] == name), None)
    if row is None:
        raise ApiError(404, f"no VM {name}")
    row = dict(row, jobs=[j.as_dict() for j in a.history.jobs(limit=20, vm=name)])
    return JSONResponse(row)


def vm_snapshots(request: Request) -> JSONResponse:
    need(request, "auditor")
    a, name = agent_of(request), _vm(request)
    row = next((p for p in a.protection() if p["name"] == name), None)
    if row is None:
        raise ApiError(404, f"no VM {name}")
    repo = row["repository"] or next(iter(a.cfg.repositories), None)
    if repo is None:
        return JSONResponse({"snapshots": [], "error": "no repository configured"})
    snaps, err = snapshots(a.cfg, repo, name)
    return JSONResponse({"repository": repo, "snapshots": snaps, "error": err})


def _known_vm(a: Agent, name: str) -> dict[str, Any]:
    row = next((p for p in a.protection() if p["name"] == name), None)
    if row is None:
        raise ApiError(404, f"no VM {name}")
    return row


def _repo_for(a: Agent, row: dict[str, Any], body: dict[str, Any]) -> str:
    repo = body.get("repository") or row["repository"] or next(iter(a.cfg.repositories), None)
    if not isinstance(repo, str) or repo not in a.cfg.repositories:
        raise ApiError(400, "repository: name one of [repositories.*]")
    return repo


def client_addr(request: Request) -> str:
    return request.client.host if request.client else "?"


def _enqueue(request: Request, type_: str, name: str, row: dict[str, Any], repo: str,
             args: dict[str, Any], host: str | None = None) -> Job:
    who: Principal = request.state.principal
    a = agent_of(request)
    job = a.enqueue(type_, name, repo, row["policy"], host or row["host"], args, None,
                    f"{who.kind}:{who.name}")
    if job is None:
        raise ApiError(409, f"a {type_} of {name} is already queued")
    log.info("%s %s queued %s of %s as job %s", who.kind, who.name, type_, name, job.id)
    return job


def queue_backup(request: Request, name: str, body: dict[str, Any]) -> Job:
    need(request, "operator")
    a = agent_of(request)
    row = _known_vm(a, name)
    mode = body.get("mode", "auto")
    if mode not in ("auto", "full", "incremental"):
        raise ApiError(400, "mode: auto, full or incremental")
    return _enqueue(request, "backup", name, row, _repo_for(a, row, body), {"mode": mode})


def queue_verify(request: Request, name: str, body: dict[str, Any]) -> Job:
    need(request, "operator")
    a = agent_of(request)
    row = _known_vm(a, name)
    boot = body.get("boot", False)
    snap = body.get("snapshot")
    if not isinstance(boot, bool) or (snap is not None and not (
            isinstance(snap, str) and re.fullmatch(r"[0-9a-f]{4,64}|latest", snap))):
        raise ApiError(400, "boot: true/false; snapshot: an id or 'latest'")
    return _enqueue(request, "verify", name, row, _repo_for(a, row, body),
                    {"boot": boot, "snapshot": snap})


def queue_copy(request: Request, name: str, body: dict[str, Any]) -> Job:
    need(request, "operator")
    a = agent_of(request)
    row = _known_vm(a, name)
    to = body.get("to")
    src = _repo_for(a, row, body)
    if not isinstance(to, str) or to not in a.cfg.repositories or to == src:
        raise ApiError(400, "to: another of [repositories.*]")
    return _enqueue(request, "copy", name, row, src, {"to": to})


def queue_restore(request: Request, name: str, body: dict[str, Any]) -> Job:
    need(request, "operator")
    a = agent_of(request)
    row = _known_vm(a, name)
    new = body.get("name")
    target = body.get("target_dir")
    snap = body.get("snapshot") or "latest"
    if new is not None and (not isinstance(new, str) or not _NAME.match(new)):
        raise ApiError(400, "name: a VM name")
    if not isinstance(target, str) or not target.startswith("/") or ".." in target.split("/"):
        raise ApiError(400, "target_dir: an absolute directory on the VM's host")
    if not isinstance(snap, str) or not re.fullmatch(r"[0-9a-f]{4,64}|latest", snap):
        raise ApiError(400, "snapshot: an id or 'latest'")
    in_place = new is None or new == name
    if in_place:
        need(request, "admin")  # overwriting the VM itself is destructive
    define, start = body.get("define", True), body.get("start", False)
    if not isinstance(define, bool) or not isinstance(start, bool):
        raise ApiError(400, "define, start: true or false")
    host = body.get("host") or row["host"]
    if not isinstance(host, str) or not _NAME.match(host):
        raise ApiError(400, "host: a host name")
    args = {"name": None if in_place else new, "target_dir": target, "snapshot": snap,
            "define": define, "start": start, "force": in_place}
    return _enqueue(request, "restore", name, row, _repo_for(a, row, body), args, host)


def _starter(fn: Callable[[Request, str, dict[str, Any]], Job]
             ) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def endpoint(request: Request) -> JSONResponse:
        need(request, "operator")  # credentials before looking at the input
        name = _vm(request)
        body = await _body(request)
        job = await asyncio.to_thread(fn, request, name, body)
        return JSONResponse(job.as_dict(), status_code=202)
    return endpoint


start_backup = _starter(queue_backup)
start_verify = _starter(queue_verify)
start_copy = _starter(queue_copy)
start_restore = _starter(queue_restore)


async def list_jobs(request: Request) -> Response:
    """Newest first; ``next`` is the cursor of the following page (``?before=``)."""
    need(request, "auditor")
    a = agent_of(request)
    limit = _int(request, "limit", 100, 1, 1000)
    offset = _int(request, "offset", 0, 0, 10_000_000)
    q = request.query_params
    state = q.get("state")
    if state is not None and state not in ("queued", "running", "ok", "failed", "interrupted"):
        raise ApiError(400, "state: queued, running, ok, failed or interrupted")
    before = q.get("before")
    if before is not None and not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", before):
        raise ApiError(400, "before: a job id (the previous page's next)")
    key = ("jobs", limit, offset, before, q.get("vm"), state, q.get("type"))
    cache = listings(a)
    body = cache.get(a, key)
    if body is None:
        version = a.history.version

        def load() -> bytes:
            jobs = a.history.jobs(limit=limit, offset=offset, vm=q.get("vm"), state=state,
                                  type_=q.get("type"), before=before)
            nxt = jobs[-1].id if len(jobs) == limit else None
            return _dumps({"jobs": [j.as_dict() for j in jobs], "next": nxt})

        async with cache.gate:
            body = await asyncio.to_thread(load)
        cache.put(key, version, body)
    return Response(body, media_type="application/json")


def get_job(request: Request) -> JSONResponse:
    need(request, "auditor")
    a = agent_of(request)
    j = a.history.job(str(request.path_params["id"])[:64])
    if j is None:
        raise ApiError(404, "no such job")
    return JSONResponse({**j.as_dict(), "events": [e for _, e in a.history.events(j.id)],
                         "log": [{"time": t, "line": line} for t, line in a.history.logs(j.id)]})


async def job_events(request: Request) -> Response:
    """Server-sent events: the job's events as they arrive, then ``end``."""
    need(request, "auditor")
    a = agent_of(request)
    job_id = str(request.path_params["id"])[:64]
    if await asyncio.to_thread(a.history.job, job_id) is None:
        raise ApiError(404, "no such job")

    async def stream() -> AsyncIterator[bytes]:
        last = int(request.headers.get("last-event-id", "0") or 0) if request.headers.get(
            "last-event-id", "0").isdigit() else 0
        idle = 0.0
        while True:
            evs = await asyncio.to_thread(a.history.events, job_id, last)
            for eid, ev in evs:
                last = eid
                kind = ev.get("type", "message")
                yield f"id: {eid}\nevent: {kind}\ndata: {json.dumps(ev)}\n\n".encode()
            j = await asyncio.to_thread(a.history.job, job_id)
            if j is None or j.state in ("ok", "failed", "interrupted"):
                state = {"state": j.state if j else "gone", "error": j.error if j else None}
                yield f"event: done\ndata: {json.dumps(state)}\n\n".encode()
                return
            if await request.is_disconnected():
                return
            idle += 0.5
            if idle >= 15:
                idle = 0
                yield b": keep-alive\n\n"
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def cancel_job(request: Request) -> JSONResponse:
    need(request, "operator")
    a = agent_of(request)
    j = a.history.job(str(request.path_params["id"])[:64])
    if j is None:
        raise ApiError(404, "no such job")
    if j.state == "queued":
        a.history.update_job(j.id, state="failed", ended=a.clock(), error="cancelled")
        return JSONResponse({"cancelled": True})
    return JSONResponse({"cancelled": a.runner.cancel(j.id)})


def list_repositories(request: Request) -> JSONResponse:
    need(request, "auditor")
    return JSONResponse({"repositories": repositories(agent_of(request))})


def coverage(request: Request) -> JSONResponse:
    need(request, "auditor")
    data, err = plan_coverage(agent_of(request).cfg)
    return JSONResponse({"coverage": data, "error": err})


def alerts(request: Request) -> JSONResponse:
    need(request, "auditor")
    return JSONResponse({"alerts": agent_of(request).history.alerts()})


def members(request: Request) -> JSONResponse:
    need(request, "auditor")
    a = agent_of(request)
    return JSONResponse({"leader": a.coord.leader(),
                         "members": [m.as_dict() for m in a.coord.members()]})


def openapi(request: Request) -> JSONResponse:
    return JSONResponse(document())


def whoami(request: Request) -> JSONResponse:
    p = need(request, "auditor")
    return JSONResponse({"name": p.name, "role": p.role, "kind": p.kind})


def config_summary(a: Agent) -> dict[str, Any]:
    return {"policies": {n: {"schedule": p.schedule, "repository": p.repository, "vms": p.vms}
                         for n, p in a.cfg.policies.items()},
            "repositories": {n: redact(r.url) for n, r in a.cfg.repositories.items()}}


routes = [
    Route("/api/v1/health", health),
    Route("/api/v1/openapi.json", openapi),
    Route("/api/v1/whoami", whoami),
    Route("/api/v1/vms", list_vms),
    Route("/api/v1/vms/{name}", get_vm),
    Route("/api/v1/vms/{name}/snapshots", vm_snapshots),
    Route("/api/v1/vms/{name}/backup", start_backup, methods=["POST"]),
    Route("/api/v1/vms/{name}/verify", start_verify, methods=["POST"]),
    Route("/api/v1/vms/{name}/copy", start_copy, methods=["POST"]),
    Route("/api/v1/vms/{name}/restore", start_restore, methods=["POST"]),
    Route("/api/v1/jobs", list_jobs),
    Route("/api/v1/jobs/{id}", get_job),
    Route("/api/v1/jobs/{id}/events", job_events),
    Route("/api/v1/jobs/{id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/repositories", list_repositories),
    Route("/api/v1/plan/coverage", coverage),
    Route("/api/v1/alerts", alerts),
    Route("/api/v1/members", members),
]
