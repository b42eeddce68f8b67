"""``/metrics`` in the Prometheus text format (0.0.4), written out by hand: six families,
computed from the history on each scrape, so they are right after a restart too."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmdr.agent.daemon import Agent

BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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
    hist: dict[tuple[str, str], list[float]] = defaultdict(list)
    for type_, outcome, secs in a.history.durations():
        hist[(type_, outcome)].append(secs)
    for (type_, outcome), values in sorted(hist.items()):
        lab = f'type="{_label(type_)}",outcome="{_label(outcome)}"'
        for b in BUCKETS:
            n = sum(1 for v in values if v <= b)
            lines.append(f'vmdr_job_duration_seconds_bucket{{{lab},le="{b}"}} {n}')
        lines.append(f'vmdr_job_duration_seconds_bucket{{{lab},le="+Inf"}} {len(values)}')
        lines.append(f"vmdr_job_duration_seconds_sum{{{lab}}} {sum(values):.3f}")
        lines.append(f"vmdr_job_duration_seconds_count{{{lab}}} {len(values)}")
    family("vmdr_repository_stored_bytes", "gauge", "Bytes the repository stores (after "
           "deduplication and compression), as last measured.")
    for r in a.history.repo_stats_latest():
        lines.append(f'vmdr_repository_stored_bytes{{repository="{_label(r[0])}"}} {r[1]}')
    family("vmdr_jobs_running", "gauge", "Jobs running now.")
    lines.append(f"vmdr_jobs_running {a.history.count_running()}")
    family("vmdr_alerts_firing", "gauge", "Alerts firing now.")
    lines.append(f"vmdr_alerts_firing {len(a.history.alerts('firing'))}")
    return "\n".join(lines) + "\n"
