"""``vmdr snapshots``, ``forget``, ``prune``, ``check``, ``protect``/``unprotect``."""

from __future__ import annotations

import argparse
from datetime import timedelta

from vmdr.cli.common import Globals, emit_json, out, repository, warn
from vmdr.errors import IntegrityError, UsageError
from vmdr.jobs.maintenance import check_job, forget_job, prune_job
from vmdr.repository import retention
from vmdr.repository.prune import DEFAULT_SAFETY_WINDOW
from vmdr.timeutil import format_time
from vmdr.ui.progress import human_bytes


def cmd_snapshots(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "snapshots") as r:
        snaps = r.list_snapshots(ns.name, chunks=False)
        rows = []
        for s in snaps:
            d = s.summary()
            try:
                d["protected"] = r.is_protected(s.id)
                ver = r.attachments(s.id, "verification")
                d["verification"] = ver[-1] if ver else None
            except IntegrityError as exc:  # one bad record hides nothing else
                warn(f"snapshot {s.name}@{s.short_id}: {exc.message} (run 'vmdr check')")
                d["protected"], d["verification"] = None, None
            rows.append(d)
    if g.json:
        emit_json(rows)
        return 0
    out(f"{'ID':<9} {'TIME':<20} {'NAME':<20} {'SIZE':>10}  TAGS")
    for d in rows:
        flag = " P" if d["protected"] else ""
        out(f"{d['short_id']:<9} {d['time'][:19]:<20} {d['name']:<20} "
            f"{human_bytes(d['size']):>10}  {','.join(d['tags'])}{flag}")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (1 or more)")
    return v


def duration(text: str) -> timedelta:
    """argparse type: a duration such as ``30s``, ``12h``, ``7d``, ``1y6M`` (or ``0``)."""
    try:
        return retention.parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _policy(ns: argparse.Namespace) -> retention.Policy:
    return retention.Policy(
        last=ns.keep_last or 0, hourly=ns.keep_hourly or 0, daily=ns.keep_daily or 0,
        weekly=ns.keep_weekly or 0, monthly=ns.keep_monthly or 0, yearly=ns.keep_yearly or 0,
        within=ns.keep_within, tags=tuple(ns.tag or ()),
    )


def cmd_forget(ns: argparse.Namespace, g: Globals) -> int:
    policy = _policy(ns)
    with repository(g, "exclusive", "forget") as r:
        res = forget_job(r, ns.names, policy, ns.dry_run, ns.prune, g.events,
                         allow_empty=ns.allow_empty)
    decisions, removed = res.decisions, res.removed
    g.result(res.as_dict())
    if g.json:
        return 0
    verb = "would remove" if ns.dry_run else "removed"
    for d in decisions:
        what = "keep  " if d.keep else "forget"
        out(f"{what} {d.snapshot.name}@{d.snapshot.short_id} {format_time(d.snapshot.time)[:19]}"
            f"  {', '.join(d.reasons)}")
    out(f"{verb} {len(removed)} of {len(decisions)} snapshots")
    return 0


def cmd_prune(ns: argparse.Namespace, g: Globals) -> int:
    window = ns.safety_window if ns.safety_window is not None else DEFAULT_SAFETY_WINDOW
    with repository(g, "exclusive", "prune") as r:
        res = prune_job(r, window, dry_run=ns.dry_run, events=g.events)
    g.result(res.as_dict())
    if not g.json:
        verb = "would delete" if ns.dry_run else "deleted"
        out(f"{verb} {res.deleted} unreferenced chunks ({human_bytes(res.deleted_bytes)}); "
            f"kept {res.kept_young} younger than the safety window; "
            f"{res.referenced} chunks in use"
            + (f"; {verb} {res.stale_temps} stale temporary objects" if res.stale_temps
               else ""))
    return 0


def _percent(text: str) -> float:
    t = text.rstrip("%")
    try:
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}") from None
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError("percentage must be in (0, 100]")
    return v / 100


def cmd_check(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "check") as r:
        ids = None
        if ns.snapshot:
            ids = [r.resolve(ref).id for ref in ns.snapshot]
        res = check_job(r, read_data=ns.read_data or 0.0, snapshot_ids=ids, events=g.events)
    g.result(res.as_dict())
    if not g.json:
        for p in res.problems:
            out(p.line())
        for p in res.warnings:
            out(p.line())
        status = "no problems found" if res.ok else f"{len(res.problems)} problems found"
        out(f"checked {res.snapshots} snapshots, {res.chunks_referenced} chunks "
            f"({res.chunks_read} read): {status}")
    if not res.ok:
        raise IntegrityError(f"check found {len(res.problems)} problems")
    return 0


def cmd_protect(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "protect") as r:
        s = r.resolve(ns.snapshot)
        r.set_protected(s.id, ns.protect)
    out(f"{'protected' if ns.protect else 'unprotected'} {s.name}@{s.short_id}")
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("snapshots", parents=parents, help="list snapshots",
                       description="List snapshots, oldest first.")
    p.add_argument("name", nargs="?", help="only snapshots of this VM/image name")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("forget", parents=parents, help="remove snapshots by retention policy",
                       description="Apply a retention policy per name; protected snapshots "
                                   "are never forgotten. Chunks are freed by 'vmdr prune'.")
    p.add_argument("names", nargs="*", help="only these names (default all)")
    for k in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{k}", type=positive_int, default=0, metavar="N",
                       help=f"keep the {k} N snapshots" if k == "last" else
                       f"keep the newest snapshot of each of the last N {k} periods")
    p.add_argument("--keep-within", type=duration, metavar="DURATION",
                   help="keep everything younger than DURATION (e.g. 12h, 7d, 2w, 1y6M)")
    p.add_argument("--tag", action="append", metavar="TAG",
                   help="apply only to snapshots with this tag (e.g. tier=critical)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    p.add_argument("--prune", action="store_true", help="run prune afterwards")
    p.add_argument("--allow-empty", action="store_true",
                   help="allow the policy to forget every snapshot of a name (refused "
                        "otherwise)")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("prune", parents=parents, help="delete unreferenced chunks",
                       description="Mark-and-sweep garbage collection. Unreferenced chunks "
                                   "younger than the safety window are kept, so a backup "
                                   "running elsewhere never loses data.")
    p.add_argument("--safety-window", type=duration, metavar="DURATION",
                   help="keep unreferenced chunks younger than this (default 6h; e.g. 0, "
                        "30s, 15m, 2h)")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("check", parents=parents, help="verify repository integrity",
                       description="Check structure; with --read-data also every chunk's "
                                   "MAC and decompression. Exit 6 on any problem.")
    p.add_argument("--read-data", nargs="?", const=1.0, type=_percent, metavar="PERCENT",
                   help="read and verify chunks (all, or a random PERCENT)")
    p.add_argument("--snapshot", action="append", metavar="REF",
                   help="only this snapshot (NAME@ID); repeatable")
    p.set_defaults(func=cmd_check)

    for name, flag in (("protect", True), ("unprotect", False)):
        p = sub.add_parser(name, parents=parents,
                           help=f"{name} a snapshot {'from' if flag else 'for'} forget",
                           description=("Protected snapshots are never removed by forget."
                                        if flag else "Allow forget to remove it again."))
        p.add_argument("snapshot", help="NAME@ID, NAME (latest) or an ID prefix")
        p.set_defaults(func=cmd_protect, protect=flag)
