"""Retention policies for ``vmdr forget``: pure functions of the snapshots and ``now``."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vmdr.errors import UsageError
from vmdr.repository.manifest import Snapshot


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None
    tags: tuple[str, ...] = ()  # only snapshots carrying every one of these tags

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within)


@dataclass
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: list[str] = field(default_factory=list)


_DURATION = re.compile(r"(\d+)([yMwdhm])")
_UNITS = {"y": 365 * 24 * 60, "M": 30 * 24 * 60, "w": 7 * 24 * 60, "d": 24 * 60, "h": 60, "m": 1}


def parse_duration(text: str) -> timedelta:
    """Parse ``1y2M3w4d5h6m`` (years, months, weeks, days, hours, minutes)."""
    pos, minutes = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        minutes += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise UsageError(f"invalid duration {text!r} (e.g. 7d, 2w, 1y6M, 12h)")
    return timedelta(minutes=minutes)


Bucket = Callable[[datetime], object]
_BUCKETS: list[tuple[str, Bucket]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: t.year),
]


def apply(
    snaps: Iterable[Snapshot], policy: Policy, now: datetime,
    protected: Callable[[Snapshot], bool] = lambda s: False,
) -> list[Decision]:
    """Decide per snapshot, grouped by name. Snapshots outside the policy's tag scope and
    protected snapshots are always kept."""
    if policy.empty():
        raise UsageError("no --keep-* option given: refusing to forget every snapshot")
    groups: dict[str, list[Snapshot]] = {}
    for s in snaps:
        groups.setdefault(s.name, []).append(s)
    out: list[Decision] = []
    for name in sorted(groups):
        newest_first = sorted(groups[name], key=lambda s: (s.time, s.id), reverse=True)
        counters = {k: getattr(policy, k) for k, _ in _BUCKETS}
        last_bucket: dict[str, object] = {}
        last_left = policy.last
        for s in newest_first:
            d = Decision(s, False)
            if policy.tags and not set(policy.tags) <= set(s.tags):
                d.keep, d.reasons = True, ["outside tag scope"]
                out.append(d)
                continue
            if protected(s):
                d.keep = True
                d.reasons.append("protected")
            if last_left > 0:
                last_left -= 1
                d.keep = True
                d.reasons.append("last")
            for kind, bucket in _BUCKETS:
                b = bucket(s.time)
                if counters[kind] > 0 and last_bucket.get(kind) != b:
                    counters[kind] -= 1
                    last_bucket[kind] = b
                    d.keep = True
                    d.reasons.append(kind)
            if policy.within is not None and now - s.time <= policy.within:
                d.keep = True
                d.reasons.append("within")
            out.append(d)
    return out
