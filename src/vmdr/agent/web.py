"""The dashboard at ``/``: server-rendered through :mod:`vmdr.templating` (Jinja2,
autoescaped, shared filters), htmx for the live parts.

Every button posts to the same handlers as the API (through :mod:`vmdr.agent.api`'s
functions), with the session's CSRF token. No build step, no CDN: htmx is vendored under
``static/`` and the growth chart is inline SVG drawn here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import os
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from vmdr import templating
from vmdr.agent import api
from vmdr.agent.auth import Principal, check_token, check_user
from vmdr.agent.daemon import Agent
from vmdr.agent.views import plan_coverage, plan_markdown, repositories, snapshots
from vmdr.plan.units import fmt_size

HERE = Path(__file__).parent
STATIC = str(HERE / "static")
# the project's one Jinja2 set-up; lenient, as job events and other pages' status records
# have optional keys (a missing one shows as nothing, not as an error page)
env = templating.environment("vmdr.agent", strict=False)


def _when(ts: float | None) -> str:
    if not ts:
        return "—"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _ago(secs: float | None) -> str:
    if secs is None:
        return "never"
    s = int(secs)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m {s % 60}s"
    return f"{s}s"


def _dur(secs: float | None) -> str:
    if secs is None:
        return ""
    return f"{secs:.1f}s" if secs < 60 else _ago(secs)


env.filters.update(when=_when, ago=_ago, bytes=fmt_size, dur=_dur)


def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    a: Agent = request.app.state.agent
    s = getattr(request.state, "session", None)
    ctx.update(request=request, me=request.state.principal, csrf=s.csrf if s else "",
               host=a.host, leader=a.leader, note=a.scheduling_note,
               firing=len(a.history.alerts("firing")))
    return HTMLResponse(env.get_template(name).render(**ctx), status_code=status)


def auth_failed(request: Request, status: int) -> Response:
    if status == 401:
        return RedirectResponse("/login", 303)
    return page(request, "error.html", 403, message="Your role may not do this.")


def _need(request: Request, role: str) -> Principal:
    return api.need(request, role)


async def login(request: Request) -> Response:
    if request.method == "GET":
        return page(request, "login.html", error=None)
    st = request.app.state
    who = api.client_addr(request)
    if st.limiter.blocked(who):
        return page(request, "login.html", 429, error="Too many failed attempts; wait a minute.")
    form = await request.form()
    token, user = str(form.get("token", "")).strip(), str(form.get("user", "")).strip()
    password = str(form.get("password", ""))
    hist = st.agent.history
    p = (await asyncio.to_thread(check_token, hist, token) if token
         else await asyncio.to_thread(check_user, hist, user, password))
    if p is None:
        st.limiter.failed(who)
        return page(request, "login.html", 401, error="Wrong token, user or password.")
    sid, _ = st.sessions.create(Principal(p.name, p.role, "session"))
    resp = RedirectResponse("/", 303)
    resp.set_cookie("vmdr_session", sid, httponly=True, samesite="strict",
                    secure=bool(st.secure_cookies), max_age=12 * 3600, path="/")
    return resp


async def logout(request: Request) -> Response:
    request.app.state.sessions.drop(request.cookies.get("vmdr_session"))
    resp = RedirectResponse("/login", 303)
    resp.delete_cookie("vmdr_session", path="/")
    return resp


def _screenshot(a: Agent, vm: str) -> str | None:
    """The newest boot-verification screenshot of *vm* the agent keeps, as a URL."""
    return screenshots(a).get(vm)


def screenshots(a: Agent) -> dict[str, str]:
    """VM → URL of its newest boot screenshot (saved by verify jobs under evidence/JOB/)."""
    root = evidence_dir(a)
    try:
        ids = sorted(os.listdir(root))
    except OSError:
        return {}
    out: dict[str, str] = {}
    jobs = a.history.jobs_by_id(ids)  # one query, not one per evidence directory
    for job_id in ids:  # ids sort by time: newer ones overwrite
        job = jobs.get(job_id)
        if not (job and job.vm and job.state == "ok"):
            continue
        shots = sorted(glob.glob(os.path.join(root, job_id, "*.png")))
        if shots:
            out[job.vm] = f"/evidence/{job_id}/{os.path.basename(shots[-1])}"
    return out


def evidence_dir(a: Agent) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(a.cfg.agent.state)), "evidence")


def overview(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    prot = a.protection()
    cov, cov_err = plan_coverage(a.cfg)
    levels = [lv["key"] for lv in (cov or {}).get("levels", [])]
    heat = []
    for name, vm in sorted(((cov or {}).get("vms") or {}).items()):
        cells = []
        for lv in levels:
            c = vm.get("levels", {}).get(lv, {})
            cells.append({"level": lv, "covered": c.get("covered"), "required": c.get("required")})
        heat.append({"vm": name, "cells": cells})
    running = a.history.jobs(limit=50, state="running")
    failed = a.history.jobs(limit=10, state="failed")
    repos = repositories(a)
    for r in repos:
        r["chart"] = growth_svg(r["growth"])
    shots = screenshots(a)
    ok = sum(1 for p in prot if p["rpo_ok"])
    tracked = sum(1 for p in prot if p["rpo_ok"] is not None)
    # at a glance: the VMs that need attention, not a fleet's whole table (that is /vms)
    attention = [p for p in prot if p["rpo_ok"] is False
                 or (p["policy"] and not p["last_backup"])]
    shown = attention[:50] if len(prot) > 50 else prot
    return page(request, "overview.html", prot=shown, total=len(prot),
                attention=len(attention), levels=levels, heat=heat[:100],
                cov_err=cov_err, running=running, failed=failed, repos=repos, shots=shots,
                rpo_ok=ok, rpo_tracked=tracked, alerts=a.history.alerts("firing"),
                recent=a.history.jobs(limit=15),
                now=a.clock())


def growth_svg(points: list[dict[str, Any]], w: int = 320, h: int = 80) -> str:
    """An inline SVG polyline of stored bytes over time (already escaped numbers only)."""
    if len(points) < 2:
        return ""
    t0, t1 = points[0]["time"], points[-1]["time"]
    vmax = max(p["stored_bytes"] for p in points) or 1
    xy = " ".join(f"{(p['time'] - t0) / max(t1 - t0, 1) * (w - 4) + 2:.1f},"
                  f"{h - 2 - p['stored_bytes'] / vmax * (h - 4):.1f}" for p in points)
    return (f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">'
            f'<polyline fill="none" stroke="#2a7" stroke-width="2" points="{xy}"/></svg>')


def vms(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    return page(request, "vms.html", prot=a.protection(), now=a.clock())


def vm_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    name = str(request.path_params["name"])
    row = next((p for p in a.protection() if p["name"] == name), None)
    if row is None:
        return page(request, "error.html", 404, message=f"No VM {name}.")
    repo = row["repository"] or next(iter(a.cfg.repositories), None)
    snaps, err = snapshots(a.cfg, repo, name) if repo else ([], "no repository")
    return page(request, "vm.html", vm=row, snaps=snaps, snap_err=err,
                jobs=a.history.jobs(limit=20, vm=name), repos=sorted(a.cfg.repositories),
                shot=_screenshot(a, name), now=a.clock())


async def vm_action(request: Request) -> Response:
    """The VM page's forms: back up now, verify, restore (same rules as the API)."""
    action = str(request.path_params["action"])
    form = await request.form()
    body: dict[str, Any] = {}
    if action == "restore":
        body = {"target_dir": str(form.get("target_dir", "")),
                "snapshot": str(form.get("snapshot") or "latest"),
                "start": form.get("start") == "on", "define": True}
        if form.get("mode") != "inplace":
            body["name"] = str(form.get("name", ""))
        if form.get("host"):
            body["host"] = str(form.get("host"))
    elif action == "verify":
        body = {"boot": form.get("boot") == "on"}
    handlers = {"backup": api.queue_backup, "verify": api.queue_verify,
                "restore": api.queue_restore}
    if action not in handlers:
        return page(request, "error.html", 404, message="No such action.")
    try:
        job = await asyncio.to_thread(handlers[action], request, str(
            request.path_params["name"]), body)
    except api.ApiError as exc:
        if exc.status in (401, 403):
            return auth_failed(request, exc.status)
        return page(request, "error.html", exc.status, message=exc.message)
    return RedirectResponse(f"/jobs/{job.id}", 303)


def jobs_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    tmpl = "jobs_table.html" if request.query_params.get("fragment") else "jobs.html"
    limit = request.query_params.get("limit", "100")
    jobs = a.history.jobs(limit=int(limit) if limit.isdigit() and 0 < int(limit) <= 500
                          else 100)
    return page(request, tmpl, jobs=jobs, rows=jobs)


def job_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    j = a.history.job(str(request.path_params["id"])[:64])
    if j is None:
        return page(request, "error.html", 404, message="No such job.")
    events = [e for _, e in a.history.events(j.id)]
    progress = next((e for e in reversed(events) if e.get("type") == "progress"), None)
    tmpl = "job_body.html" if request.query_params.get("fragment") else "job.html"
    return page(request, tmpl, job=j, events=events, progress=progress,
                logs=a.history.logs(j.id))


def repos_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    repos = repositories(a)
    for r in repos:
        r["chart"] = growth_svg(r["growth"], 480, 120)
    return page(request, "repos.html", repos=repos)


def plan_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    text, err = plan_markdown(a.cfg)
    return page(request, "plan.html", text=text, err=err)


def evidence(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    job, name = str(request.path_params["job"]), str(request.path_params["file"])
    if "/" in job or ".." in job or "/" in name or not name.endswith(".png"):
        return page(request, "error.html", 404, message="Not found.")
    path = os.path.join(evidence_dir(a), job, name)
    if not os.path.isfile(path):
        return page(request, "error.html", 404, message="Not found.")
    return FileResponse(path, media_type="image/png")


routes = [
    Route("/", overview),
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/vms", vms),
    Route("/vms/{name}", vm_page),
    Route("/vms/{name}/{action}", vm_action, methods=["POST"]),
    Route("/jobs", jobs_page),
    Route("/jobs/{id}", job_page),
    Route("/repositories", repos_page),
    Route("/plan", plan_page),
    Route("/evidence/{job}/{file}", evidence),
]
