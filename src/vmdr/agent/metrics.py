"""``/metrics`` in the Prometheus text format (0.0.4), written out by hand: six families,
computed from the history (so they are right after a restart too); the duration histogram
is re-read only when the history changed.

Who may scrape (server.metrics_open): anyone on a loopback listener with no
``metrics_token_file``; otherwise the bearer token of that file or an auditor credential."""

from __future__ import annotations

import bisect
import itertools
import time
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmdr.agent.daemon import Agent

BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


Histogram = list[tuple[tuple[str, str], tuple[list[int], int, float]]]
_hist: weakref.WeakKeyDictionary[Agent, tuple[int, float, Histogram]] = (
    weakref.WeakKeyDictionary())
HIST_TTL = 60.0  # a fleet's other agents' jobs show within this


def histogram(a: Agent) -> Histogram:
    """The job-duration histogram over the whole history: read again only when a job of
    this agent changed it (or, in a fleet, after HIST_TTL), not on every scrape."""
    hit = _hist.get(a)
    if hit and hit[0] == a.history.version and (
            not a.history.shared or time.monotonic() - hit[1] < HIST_TTL):
        return hit[2]
    version = a.history.version
    per: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for type_, outcome, secs in a.history.durations():
        per[(type_, outcome)][bisect.bisect_left(BUCKETS, secs)] += 1
        sums[(type_, outcome)] += secs
    out: Histogram = []
    for k in sorted(per):
        cum = list(itertools.accumulate(per[k]))
        out.append((k, (cum[:-1], cum[-1], sums[k])))
    _hist[a] = (version, time.monotonic(), out)
    return out


def render(a: Agent, now: float | None = None) -> str:
    now = a.clock() if now is None else now
    lines: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    prot = a.protection(now)
    family("vmdr_backup_last_success_timestamp_seconds", "gauge",
           "End time of the newest successful backup of the VM.")
    for p in prot:
        if p["last_backup"]:
            lines.append(f'vmdr_backup_last_success_timestamp_seconds{{vm="{_label(p["name"])}"}}'
                         f' {p["last_backup"]:.3f}')
    family("vmdr_rpo_seconds", "gauge",
           "Achieved recovery point objective: seconds since the newest successful backup.")
    for p in prot:
        if p["rpo_s"] is not None:
            lines.append(f'vmdr_rpo_seconds{{vm="{_label(p["name"])}"}} {p["rpo_s"]:.3f}')
    family("vmdr_rpo_target_seconds", "gauge", "The RPO the VM's policy or tier asks for.")
    for p in prot:
        if p["rpo_target_s"] is not None:
            lines.append(f'vmdr_rpo_target_seconds{{vm="{_label(p["name"])}"}} '
                         f'{p["rpo_target_s"]:.0f}')
    family("vmdr_verify_last_success_timestamp_seconds", "gauge",
           "End time of the newest successful verification of the VM's snapshots.")
    for p in prot:
        if p["last_verified"]:
            lines.append(f'vmdr_verify_last_success_timestamp_seconds{{vm="{_label(p["name"])}"}}'
                         f' {p["last_verified"]:.3f}')
    family("vmdr_job_duration_seconds", "histogram", "Duration of finished jobs.")
    for (type_, outcome), (counts, n, total) in histogram(a):
        lab = f'type="{_label(type_)}",outcome="{_label(outcome)}"'
        for b, c in zip(BUCKETS, counts, strict=True):
            lines.append(f'vmdr_job_duration_seconds_bucket{{{lab},le="{b}"}} {c}')
        lines.append(f'vmdr_job_duration_seconds_bucket{{{lab},le="+Inf"}} {n}')
        lines.append(f"vmdr_job_duration_seconds_sum{{{lab}}} {total:.3f}")
        lines.append(f"vmdr_job_duration_seconds_count{{{lab}}} {n}")
    family("vmdr_repository_stored_bytes", "gauge", "Bytes the repository stores (after "
           "deduplication and compression), as last measured.")
    for r in a.history.repo_stats_latest():
        lines.append(f'vmdr_repository_stored_bytes{{repository="{_label(r[0])}"}} {r[1]}')
    family("vmdr_jobs_running", "gauge", "Jobs running now.")
    lines.append(f"vmdr_jobs_running {a.history.count_running()}")
    family("vmdr_alerts_firing", "gauge", "Alerts firing now.")
    lines.append(f"vmdr_alerts_firing {len(a.history.alerts('firing'))}")
    return "\n".join(lines) + "\n"
