"""The one place that reads the wall clock. Everything else takes ``now`` as an argument."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from vmdr.errors import UsageError

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC)


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
