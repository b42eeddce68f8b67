"""The dashboard's ``/recovery`` page: the recovery plans of the config (VMs, priority
groups, readiness) and the runs of each (``vmdr failover`` / ``vmdr failback`` reports),
with each run's HTML report and screenshots served from the reports directory."""

from __future__ import annotations

import os
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from vmdr.agent.daemon import Agent
from vmdr.agent.web import _need, page
from vmdr.errors import VmdrError
from vmdr.plan import recovery
from vmdr.plan import recovery_runs as runs

_FILE = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9_.-]+\.(html|png|ppm)$")


def _reports(a: Agent) -> str:
    return os.environ.get("VMDR_RECOVERY_REPORTS") or recovery.reports_dir(a.cfg)


def recovery_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    plans: list[dict[str, Any]] = []
    err = None
    try:
        plans = [p.as_dict() for p in recovery.load_plans(a.cfg).values()]
    except VmdrError as exc:
        err = exc.message
    reports = _reports(a)
    all_runs = list(reversed(runs.list_runs(reports)))
    for p in plans:
        mine = [r for r in all_runs if r.plan == p["name"]]
        p["last_test"] = next((r for r in mine if r.kind == "test"), None)
        p["last_run"] = mine[0] if mine else None
    return page(request, "recovery.html", plans=plans, runs=all_runs[:50], err=err,
                reports=reports)


def recovery_file(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    name = str(request.path_params["file"])
    path = os.path.join(_reports(a), name)
    if not _FILE.match(name) or not os.path.isfile(path):
        return page(request, "error.html", 404, message="Not found.")
    kind = {"html": "text/html", "png": "image/png", "ppm": "image/x-portable-pixmap"}
    return FileResponse(path, media_type=kind[name.rsplit(".", 1)[1]],
                        headers={"Content-Security-Policy": "default-src 'none'; "
                                 "img-src 'self'; style-src 'unsafe-inline'"})


routes = [
    Route("/recovery", recovery_page),
    Route("/recovery/runs/{file}", recovery_file),
]
