"""``vmdr jobs``: the agent's job history."""

from __future__ import annotations

import argparse
from datetime import datetime

from vmdr.cli.common import Globals, emit_json, out
from vmdr.errors import UsageError
from vmdr.ui.progress import human_bytes


def _t(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def cmd_jobs(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.agent.history import History

    h = History.open(g.config.agent.state, g.config.agent.database)
    jobs = h.jobs(limit=ns.limit, vm=ns.vm, state=ns.state, type_=ns.type)
    if g.json:
        emit_json([j.as_dict() for j in jobs])
        return 0
    out(f"{'ID':<24} {'TYPE':<8} {'VM':<20} {'STATE':<11} {'STARTED':<19} {'TIME':>7} "
        f"{'STORED':>10}")
    for j in jobs:
        d = j.as_dict()["duration_s"]
        out(f"{j.id:<24} {j.type:<8} {(j.vm or '-')[:20]:<20} {j.state:<11} "
            f"{_t(j.started):<19} {(f'{d:.0f}s' if d is not None else '-'):>7} "
            f"{human_bytes(j.bytes) if j.bytes is not None else '-':>10}")
    return 0


def cmd_jobs_show(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.agent.history import History

    h = History.open(g.config.agent.state, g.config.agent.database)
    j = h.job(ns.id)
    if j is None:
        raise UsageError(f"no job {ns.id}")
    events = [e for _, e in h.events(j.id)]
    logs = h.logs(j.id)
    if g.json:
        emit_json({**j.as_dict(), "events": events,
                   "log": [{"time": t, "line": line} for t, line in logs]})
        return 0
    for k, v in j.as_dict().items():
        if k in ("args", "result") or v is None:
            continue
        out(f"{k + ':':<15}{_t(v) if k in ('created', 'started', 'ended', 'scheduled_for') else v}")
    out(f"events:        {len(events)}")
    for e in events:
        if e.get("type") in ("start", "phase", "warning", "error", "end"):
            rest = {k: v for k, v in e.items() if k not in ("type", "time", "job")}
            out(f"  {e.get('time', '')} {e.get('type')}: {rest}")
    if logs:
        out("log:")
        for t, line in logs:
            out(f"  {_t(t)} {line}")
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("jobs", parents=parents, help="the agent's job history",
                       description="List the jobs the agent ran or queued (newest first), "
                                   "from its history ([agent] state or database).")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--vm", help="only jobs of this VM")
    p.add_argument("--state", choices=["queued", "running", "ok", "failed", "interrupted"])
    p.add_argument("--type", choices=["backup", "verify", "copy", "prune", "restore"])
    p.set_defaults(func=cmd_jobs)
    s = p.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    sh = s.add_parser("show", parents=parents, help="one job with its events and log")
    sh.add_argument("id")
    sh.set_defaults(func=cmd_jobs_show)
