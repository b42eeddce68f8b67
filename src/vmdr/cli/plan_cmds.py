"""``vmdr plan coverage | write | check``: disaster coverage, the written plan, monitoring."""

from __future__ import annotations

import argparse
import errno
import os
import sys

from vmdr.cli.common import Globals, emit_json, out
from vmdr.errors import NoSpace, UsageError
from vmdr.jobs import plan as planjob
from vmdr.plan import report, runbook
from vmdr.plan.coverage import Coverage
from vmdr.plan.hafacts import HAFacts
from vmdr.plan.inventory import Inventory
from vmdr.timeutil import parse_time, utcnow


def _evaluate(ns: argparse.Namespace, g: Globals) -> Coverage:
    now = utcnow()
    if ns.now:
        try:
            now = parse_time(ns.now)
        except ValueError:
            raise UsageError(f"--now: invalid time {ns.now!r} (e.g. 2026-11-25T08:00:00Z)"
                             ) from None
    from vmdr.cli.ha_ops_cmds import open_records
    from vmdr.ha.planfacts import plan_facts

    def ha(inv: Inventory) -> HAFacts:  # etcd is asked also --offline: it is no host
        return plan_facts(inv, lambda: open_records(g.config))

    return planjob.evaluate(
        g.config, opener=planjob.repository_opener(g.key_file, g.password_file),
        connector=None if ns.offline else planjob.readonly_connector, now=now,
        timeout=ns.timeout, use_cache=not ns.no_cache, ha=ha)


def cmd_coverage(ns: argparse.Namespace, g: Globals) -> int:
    cov = _evaluate(ns, g)
    if g.json:
        emit_json(report.to_json(cov))
    else:
        for line in report.to_text(cov):
            out(line)
    return 0


def cmd_write(ns: argparse.Namespace, g: Globals) -> int:
    fmt = ns.format
    if fmt is None:
        ext = os.path.splitext(ns.output or "")[1].lower().lstrip(".")
        fmt = {"htm": "html", "html": "html", "pdf": "pdf"}.get(ext, "md")
    if fmt == "pdf" and not ns.output:
        raise UsageError("--format pdf needs -o FILE")
    plan = runbook.build(_evaluate(ns, g))
    if fmt == "md":
        from vmdr.plan import render_md
        data = render_md.render(plan).encode()
    elif fmt == "html":
        from vmdr.plan import render_html
        data = render_html.render(plan).encode()
    else:
        from vmdr.plan import render_pdf
        data = render_pdf.render(plan)
    if not ns.output or ns.output == "-":
        sys.stdout.buffer.write(data)
        return 0
    try:
        with open(ns.output, "wb") as f:
            f.write(data)
    except OSError as exc:
        if os.path.isfile(ns.output):
            os.unlink(ns.output)  # no truncated plan left to be mistaken for the real one
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left on device writing {ns.output}") from None
        raise UsageError(f"{ns.output}: cannot write: {exc.strerror}") from None
    if g.json:
        emit_json({"output": ns.output, "format": fmt, "bytes": len(data),
                   "scenarios": len(plan.scenarios), "gaps": len(plan.gaps)})
    else:
        out(f"wrote {ns.output} ({fmt}, {len(plan.scenarios)} scenarios, "
            f"{len(plan.gaps)} open gaps)")
    return 0


def cmd_check(ns: argparse.Namespace, g: Globals) -> int:
    from dataclasses import replace

    from vmdr.jobs.recovery_check import plan_problems

    source = os.environ.get("VMDR_CONNECT") or g.config.connect
    rec = plan_problems(g.config, source, ns.offline)
    cov = _evaluate(ns, replace(g, config=rec.config))
    problems = cov.problems() + rec.problems
    if ns.strict:
        problems += [f"{vc.vm.name}: 3-2-1-1-0 not met: {'; '.join(vc.rule.missing())}"
                     for vc in cov.vms.values() if not vc.rule.ok]
        problems += [f"N+1: {h.problem}" for h in cov.n1 if h.problem]
    if g.json:
        emit_json({"ok": not problems, "vms": len(cov.vms), "problems": problems})
    elif problems:
        for p in problems:
            out(p)
    else:
        out(f"ok: {len(cov.vms)} VMs meet their targets and verification policy")
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "plan", parents=parents, help="disaster coverage, the written DR plan, monitoring",
        description="Inventory-driven disaster coverage and the DR/BC plan. The inventory "
                    "is the config file (--config): [locations], [hosts], [repositories], "
                    "[vaults], [roles], [plan] and the plan keys of [vm.NAME].")
    psub = p.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--offline", action="store_true",
                       help="do not contact the hosts; use the cached discovery (stale)")
        q.add_argument("--timeout", type=float, default=30.0, metavar="S",
                       help="seconds to wait for each host and repository (default 30)")
        q.add_argument("--no-cache", action="store_true",
                       help="neither read nor write the discovery/repository cache")
        q.add_argument("--now", metavar="TIME",
                       help="evaluate as of this UTC time (ISO 8601), e.g. for what-if runs")

    q = psub.add_parser("coverage", parents=parents, help="coverage per VM and disaster level",
                        description="For every VM and disaster level: is there a restorable "
                                    "copy outside the blast radius, achieved RPO, estimated "
                                    "RTO, last boot verification; 3-2-1-1-0; N+1 hosts.")
    common(q)
    q.set_defaults(func=cmd_coverage)
    q = psub.add_parser("write", parents=parents, help="write the DR/BC plan (md, html, pdf)",
                        description="Write the contingency plan (NIST SP 800-34 structure) "
                                    "with exact restore commands per scenario.")
    q.add_argument("--format", choices=["md", "html", "pdf"],
                   help="output format (default: from -o's extension, else md)")
    q.add_argument("-o", "--output", metavar="FILE", help="output file (default: stdout)")
    common(q)
    q.set_defaults(func=cmd_write)
    q = psub.add_parser("check", parents=parents, help="exit 1 with one line per problem",
                        description="For cron and monitoring: one line per VM that misses "
                                    "its RPO or RTO, lacks a required level or has no recent "
                                    "boot verification, per unreadable repository, and per "
                                    "problem of a recovery plan (as `vmdr recovery check`: "
                                    "the DR host, replicas, networks, RPO and capacity; "
                                    "--offline: only what the config shows). "
                                    "Exit 0 when there is none, 1 otherwise.",
                        epilog="exit codes: 0 no problem, 1 problems (one line each), "
                               "2 bad inventory or arguments")
    q.add_argument("--strict", action="store_true",
                   help="also report 3-2-1-1-0 and N+1 failures")
    common(q)
    q.set_defaults(func=cmd_check)
