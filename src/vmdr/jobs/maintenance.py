"""``vmdr forget``, ``prune`` and ``check`` as jobs: the repository's maintenance steps
with their events (:mod:`vmdr.events`); the work itself lives in ``repository/``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from vmdr.events import JobEvents
from vmdr.repository import retention
from vmdr.repository.check import CheckResult, check
from vmdr.repository.prune import DEFAULT_SAFETY_WINDOW, PruneResult, prune
from vmdr.repository.repo import Repository
from vmdr.timeutil import format_time


@dataclass
class ForgetResult:
    dry_run: bool
    decisions: list[retention.Decision]
    pruned: PruneResult | None = None

    @property
    def removed(self) -> list[retention.Decision]:
        return [d for d in self.decisions if not d.keep]

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "decisions": [
            {"id": d.snapshot.id, "name": d.snapshot.name, "time": format_time(d.snapshot.time),
             "keep": d.keep, "reasons": d.reasons} for d in self.decisions],
            "prune": self.pruned.as_dict() if self.pruned else None}


def forget_job(repo: Repository, names: list[str], policy: retention.Policy,
               dry_run: bool = False, then_prune: bool = False,
               events: JobEvents | None = None, allow_empty: bool = False) -> ForgetResult:
    """Apply *policy* to the snapshots of *names* (all when empty); the caller holds the
    exclusive lock. A run that would leave a name with no snapshot is refused unless
    *allow_empty* (see :func:`vmdr.repository.retention.apply`)."""
    ev = events or JobEvents()
    ev.phase("plan")
    snaps = [s for s in repo.list_snapshots(chunks=False) if not names or s.name in names]
    res = ForgetResult(dry_run, retention.apply(snaps, policy, repo.clock(),
                                                lambda s: repo.is_protected(s.id),
                                                allow_empty=allow_empty))
    if not dry_run:
        ev.phase("forget", f"forgetting {len(res.removed)} of {len(res.decisions)} snapshots")
        for d in res.removed:
            repo.delete_snapshot(d.snapshot.id)
        if then_prune:
            res.pruned = prune_job(repo, events=ev)
    return res


def prune_job(repo: Repository, safety_window: timedelta = DEFAULT_SAFETY_WINDOW,
              dry_run: bool = False, events: JobEvents | None = None) -> PruneResult:
    """Delete unreferenced chunks; the caller holds the exclusive lock."""
    ev = events or JobEvents()
    ev.phase("prune", "pruning unreferenced chunks" + (" (dry run)" if dry_run else ""))
    return prune(repo, safety_window, dry_run=dry_run)


def check_job(repo: Repository, read_data: float = 0.0, snapshot_ids: list[str] | None = None,
              events: JobEvents | None = None) -> CheckResult:
    """Check the repository; with *read_data* the bytes read are the job's progress."""
    ev = events or JobEvents()
    ev.phase("check", "checking the repository" + (" and reading its data" if read_data else ""))
    progress = ev.progress("check") if read_data else None
    res = check(repo, read_data=read_data, snapshot_ids=snapshot_ids,
                progress=progress.advance if progress else None)
    if progress:
        progress.finish()
    for p in res.problems:
        ev.warning(p.line())
    return res
