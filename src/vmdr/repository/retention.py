"""Retention policies for ``vmdr forget``: pure functions of the snapshots and ``now``.

Every caller (the CLI, the config, the agent) goes through :class:`Policy`, which refuses
negative or non-integer counts and non-positive or absurd durations, and through
:func:`apply`, which refuses a plan that would leave a name with no snapshot at all
unless ``allow_empty`` is given (borg and restic refuse this too).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vmdr.errors import UsageError
from vmdr.repository.manifest import Snapshot

COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

_DURATION = re.compile(r"([0-9]{1,12})([yMwdhms])")  # ASCII digits only
_UNIT_SECONDS = {"y": 365 * 86400, "M": 30 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600,
                 "m": 60, "s": 1}
#: The longest duration vmdr accepts anywhere (retention, safety windows): 1000 years.
MAX_DURATION = timedelta(days=1000 * 365)


def parse_duration(text: str) -> timedelta:
    """Parse ``1y2M3w4d5h6m7s`` (years of 365 days, months of 30 days, weeks, days, hours,
    minutes, seconds). A bare ``0`` is zero. Durations longer than 1000 years are refused
    with ``UsageError`` (never ``OverflowError``)."""
    if text.strip() == "0":
        return timedelta(0)
    pos, seconds = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        seconds += int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise UsageError(f"invalid duration {text!r} (e.g. 30s, 15m, 12h, 7d, 2w, 1y6M)")
    if seconds > MAX_DURATION.total_seconds():
        raise UsageError(f"duration {text!r} is too long (at most 1000y)")
    return timedelta(seconds=seconds)


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

    def __post_init__(self) -> None:
        for k in COUNTS:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UsageError(f"keep-{k} must be a positive integer, not {v!r}")
        if self.within is not None and not timedelta(0) < self.within <= MAX_DURATION:
            raise UsageError(f"keep-within must be a positive duration of at most 1000y, "
                             f"not {self.within}")

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within)


@dataclass
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: list[str] = field(default_factory=list)


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
    protected: Callable[[Snapshot], bool] = lambda s: False, allow_empty: bool = False,
) -> list[Decision]:
    """Decide per snapshot, grouped by name. Snapshots outside the policy's tag scope and
    protected snapshots are always kept.

    Raises ``UsageError`` if the plan would forget every snapshot of some name, unless
    *allow_empty*: a typo in a policy must never delete a VM's last backup."""
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
    if not allow_empty:
        emptied = sorted(set(groups) - {d.snapshot.name for d in out if d.keep})
        if emptied:
            shown = ", ".join(repr(n) for n in emptied[:5]) + (", …" if len(emptied) > 5 else "")
            raise UsageError(f"refusing to forget every snapshot of {shown}: the policy keeps "
                             "none of them (give --allow-empty if that is what you want)")
    return out
