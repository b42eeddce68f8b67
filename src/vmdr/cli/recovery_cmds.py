"""``vmdr recovery check|list``, ``vmdr failover PLAN [--planned|--test]``,
``vmdr failover report [RUN]`` and ``vmdr failback PLAN``: recovery plans at a hot site."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vmdr.cli.common import Globals, emit_json, out, warn
from vmdr.errors import RecoveryCheckFailed, UsageError
from vmdr.jobs.failback import failback
from vmdr.jobs.failover import Options, Outcome, failover
from vmdr.jobs.recovery_check import check_plan
from vmdr.plan import inventory as invmod
from vmdr.plan import recovery
from vmdr.plan import recovery_runs as runs
from vmdr.timeutil import parse_time


def _source(ns: argparse.Namespace, g: Globals) -> str:
    return str(getattr(ns, "connect", None) or os.environ.get("VMDR_CONNECT")
               or g.config.connect)


def _reports(g: Globals) -> str:
    return os.environ.get("VMDR_RECOVERY_REPORTS") or recovery.reports_dir(g.config)


def _plans(g: Globals, name: str | None) -> list[recovery.RecoveryPlan]:
    plans = recovery.load_plans(g.config)
    if name is not None:
        return [recovery.plan_named(g.config, name)]
    if not plans:
        raise UsageError(f"no recovery plans: add [{recovery.SECTION}.NAME] to "
                         f"{g.config.path or 'the config'}")
    return [plans[n] for n in sorted(plans)]


# -- recovery check / list ---------------------------------------------------------------------


def cmd_recovery(ns: argparse.Namespace, g: Globals) -> int:
    if ns.action == "list":
        plans = _plans(g, ns.plan) if ns.plan or recovery.load_plans(g.config) else []
        if g.json:
            emit_json({"plans": [p.as_dict() for p in plans]})
            return 0
        for p in plans:
            out(f"{p.name}: {len(p.vms)} VM(s) in {len(p.groups)} group(s): "
                + "; ".join(f"{g_.number}: {', '.join(g_.vms)} (ready {g_.ready})"
                            for g_ in p.groups))
        if not plans:
            out("no recovery plans")
        return 0
    inv = invmod.from_config(g.config)
    results = [check_plan(p, inv, _source(ns, g)) for p in _plans(g, ns.plan)]
    bad = [r for r in results if not r.ok]
    if g.json:
        emit_json({"plans": [{"plan": r.plan, "ok": r.ok, "vms": r.vms,
                              "memory_needed": r.memory_needed,
                              "findings": [f.as_dict() for f in r.findings]}
                             for r in results]})
    else:
        for r in results:
            out(f"{r.plan}: {'OK' if r.ok else 'PROBLEMS'} ({r.vms} VM(s))")
            for f in r.findings:
                out(f"  {f.severity}: {f.check}: {f.vm + ': ' if f.vm else ''}{f.message}")
    if bad:
        n = sum(1 for r in bad for f in r.findings if f.severity == "error")
        raise RecoveryCheckFailed(f"{n} problem(s) in recovery plan(s) "
                                  f"{', '.join(r.plan for r in bad)}")
    return 0


# -- failover / failback -------------------------------------------------------------------------


def _show(g: Globals, o: Outcome) -> int:
    rep = o.report
    if g.json:
        emit_json({**rep.as_dict(), "report_json": o.json_path, "report_html": o.html_path})
    else:
        for w in rep.warnings:
            warn(w)
        for v in rep.vms:
            rto = "-" if v.rto_s is None else f"{v.rto_s:.1f}s"
            rpo = "-" if v.rpo_s is None else f"{v.rpo_s:.1f}s"
            out(f"  {v.vm:<20} group {v.group}  {v.outcome:<11} point {v.point or '-':<22} "
                f"RPO {rpo:>8}  RTO {rto:>8}" + (f"  ({v.error})" if v.error else ""))
        out(f"{rep.kind} run {rep.run} of {rep.plan}: {rep.outcome} in "
            f"{rep.duration_s:.1f}s; report {o.html_path}")
    if o.error is not None:
        raise o.error
    return 0


def cmd_failover(ns: argparse.Namespace, g: Globals) -> int:
    if ns.plan == "report":
        return cmd_report(ns, g)
    if ns.run is not None:
        raise UsageError(f"unexpected argument {ns.run!r}")
    if ns.planned and ns.test:
        raise UsageError("--planned and --test exclude each other")
    kind = "planned" if ns.planned else "test" if ns.test else "unplanned"
    point = None
    if ns.point:
        try:
            point = parse_time(ns.point)
        except ValueError:
            raise UsageError(f"--point: not a time: {ns.point!r} (e.g. "
                             "2026-12-06T03:00:00Z)") from None
    plan = recovery.plan_named(g.config, ns.plan)
    opts = Options(kind, _reports(g), _source(ns, g), point, ns.force,
                   g.config.scratch_dir, not ns.no_screenshots,
                   log=(lambda m: None) if g.json else (lambda m: out(f"… {m}")))
    return _show(g, failover(plan, opts))


def cmd_failback(ns: argparse.Namespace, g: Globals) -> int:
    plan = recovery.plan_named(g.config, ns.plan)
    opts = Options("failback", _reports(g), _source(ns, g), None, False,
                   g.config.scratch_dir, not ns.no_screenshots,
                   log=(lambda m: None) if g.json else (lambda m: out(f"… {m}")))
    return _show(g, failback(plan, opts))


def cmd_report(ns: argparse.Namespace, g: Globals) -> int:
    d = _reports(g)
    if ns.run is None:
        reps = runs.list_runs(d, ns.of)
        if g.json:
            emit_json({"reports": d, "runs": [_summary(r) for r in reps]})
            return 0
        if not reps:
            out(f"no runs in {d}")
        for r in reps:
            rto = "-" if r.rto_s is None else f"{r.rto_s:.1f}s"
            out(f"{r.run:<44} {r.outcome:<7} {r.duration_s:>7.1f}s  RTO {rto:>8}")
        return 0
    rep = runs.load_run(d, ns.run)
    if g.json:
        emit_json(rep.as_dict())
        return 0
    out(f"{rep.run}: {rep.kind} failover of {rep.plan}, {rep.outcome}"
        + (f" ({rep.error})" if rep.error else ""))
    for s in rep.steps:
        out(f"  {s.started}  {s.duration_s:>6.1f}s  {s.status:<7} {s.name}"
            + (f" {s.vm}" if s.vm else "") + (f": {s.detail}" if s.detail else ""))
    out(f"HTML: {os.path.join(d, rep.run + '.html')}")
    return 0


def _summary(r: runs.RunReport) -> dict[str, Any]:
    return {"run": r.run, "plan": r.plan, "kind": r.kind, "started": r.started,
            "outcome": r.outcome, "duration_s": r.duration_s, "rto_s": r.rto_s,
            "error": r.error}


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "recovery", parents=parents,
        help="recovery plans: check them against both sites, list them",
        description="'vmdr recovery check [PLAN]' validates each recovery plan of the config "
                    "against the DR and source sites before a disaster: replicas present and "
                    "younger than their RPO target, standbys defined and stopped, networks "
                    "present at the DR host, memory and vCPUs there, source VMs known. "
                    "'vmdr recovery list' shows the plans and their priority groups.",
        epilog="exit codes: 2 a broken plan in the config, 42 the check found problems")
    p.add_argument("action", choices=("check", "list"))
    p.add_argument("plan", nargs="?", metavar="PLAN", help="one plan (default: every plan)")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="the source's libvirt URI for VMs whose inventory host has none")
    p.set_defaults(func=cmd_recovery)

    f = sub.add_parser(
        "failover", parents=parents,
        help="bring a recovery plan up at the DR site (--planned, --test, unplanned); "
             "'failover report' shows past runs",
        description="Bring the VMs of a recovery plan up at the DR site from their replicas, "
                    "group by group with readiness checks, re-IP and scripts. --planned: "
                    "shut the sources down cleanly, final replica cycle, zero data loss. "
                    "--test: throw-away overlays in an isolated network, then clean up; "
                    "production and replicas keep running. Without either: the source site "
                    "is gone; the newest restore point (or --point TIME) is used and the "
                    "data lost per VM is reported. Every run writes a JSON and HTML report. "
                    "'vmdr failover report [RUN]' lists or shows them.",
        epilog="exit codes: 2 bad plan or arguments, 10 DR network missing, 11 no such VM or "
               "standby, 12 a host is unreachable, 13 the plan (or a VM) is locked by "
               "another run, 40 replica older than its RPO target (--force), 41 a step failed "
               "(the sources are left running), 43 the DR host lacks the memory (--force)")
    f.add_argument("plan", metavar="PLAN", help="the recovery plan ('report': list runs)")
    f.add_argument("run", nargs="?", metavar="RUN", help="failover report: the run to show")
    how = f.add_mutually_exclusive_group()
    how.add_argument("--planned", action="store_true",
                     help="planned migration: clean shutdown, final sync, no data loss")
    how.add_argument("--test", action="store_true",
                     help="test failover in an isolated bubble, cleaned up after; "
                         "replication goes on meanwhile")
    f.add_argument("--point", metavar="TIME",
                   help="unplanned: the newest restore point at or before TIME (ISO, UTC)")
    f.add_argument("--force", action="store_true",
                   help="go on although a replica is older than its RPO target (planned) "
                        "or the DR host has less free memory than the plan needs")
    f.add_argument("--plan", dest="of", metavar="PLAN",
                   help="failover report: only the runs of this plan")
    f.add_argument("--no-screenshots", action="store_true", help="take no screenshots")
    f.add_argument("-c", "--connect", metavar="URI",
                   help="the source's libvirt URI for VMs whose inventory host has none")
    f.set_defaults(func=cmd_failover)

    b = sub.add_parser(
        "failback", parents=parents,
        help="return a failed-over recovery plan to its source site and re-protect it",
        description="Shut the plan's VMs down at the DR site, move back only what changed "
                    "there since the failover (everything after an unplanned one), start the "
                    "sources group by group with the readiness checks, then re-protect: "
                    "the DR changes are folded into the standbys and a replica cycle runs "
                    "in the original direction. Writes a report like 'vmdr failover'.",
        epilog="exit codes: 2 not failed over, 13 the plan is locked, 41 a step failed (the "
               "VMs keep running at the DR site)")
    b.add_argument("plan", metavar="PLAN")
    b.add_argument("--no-screenshots", action="store_true", help="take no screenshots")
    b.add_argument("-c", "--connect", metavar="URI",
                   help="the source's libvirt URI for VMs whose inventory host has none")
    b.set_defaults(func=cmd_failback)
