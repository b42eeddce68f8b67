"""systemd calendar events (``systemd.time(7)``), the schedule syntax of PBS and of vmdr policies.

An event is ``[WEEKDAYS] [DATE] [TIME]``:

* ``WEEKDAYS``: ``mon``, ``Mon..Fri``, ``sat,sun`` (names or 3-letter abbreviations);
* ``DATE``: ``YYYY-MM-DD`` or ``MM-DD``, each field ``*``, a number, a list ``1,15``, a range
  ``1..5`` or a repetition ``START/STEP`` (``*-*-01``, ``*-1/3-01``);
* ``TIME``: ``HH:MM[:SS]`` with the same field syntax (``*:0/15``, ``02:00``, ``8..18:00``).

Omitted parts match everything, except seconds and an omitted time, which are ``00``. The
shorthands ``minutely``, ``hourly``, ``daily``, ``weekly``, ``monthly``, ``quarterly``,
``semiannually`` and ``yearly`` (``annually``) mean what systemd says. As in PBS, a shorthand
of a day or longer may be followed by a time: ``daily 02:00``, ``weekly 03:30``.

Evaluation is a pure function of the event and ``now`` (an aware datetime): the wall-clock
fields are compared in ``now``'s time zone.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from vmdr.errors import CalendarError

__all__ = ["CalendarError", "CalendarEvent", "parse"]

_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_LONG_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]

# shorthand -> (weekdays, date, time); a trailing time replaces the time part
_SHORTHANDS: dict[str, tuple[str, str, str]] = {
    "minutely": ("", "*-*-*", "*:*:00"),
    "hourly": ("", "*-*-*", "*:00:00"),
    "daily": ("", "*-*-*", "00:00:00"),
    "weekly": ("mon", "*-*-*", "00:00:00"),
    "monthly": ("", "*-*-01", "00:00:00"),
    "quarterly": ("", "*-01,04,07,10-01", "00:00:00"),
    "semiannually": ("", "*-01,07-01", "00:00:00"),
    "yearly": ("", "*-01-01", "00:00:00"),
    "annually": ("", "*-01-01", "00:00:00"),
}
_TIME_ALLOWED = {"daily", "weekly", "monthly", "quarterly", "semiannually", "yearly", "annually"}
# systemd searches this far for a match; leap days need up to 8 years (2096 -> 2104)
_HORIZON_DAYS = 366 * 9


def _field(text: str, lo: int, hi: int, what: str, event: str) -> frozenset[int]:
    """The values of one field: ``*``, ``N``, ``A..B``, ``A/STEP``, ``*/STEP``, lists."""
    values: set[int] = set()
    for part in text.split(","):
        step = 0
        if "/" in part:
            part, _, step_s = part.partition("/")
            step = _int(step_s, what, event)
            if step < 1:
                raise CalendarError(f"calendar event {event!r}: {what}: step must be ≥ 1")
        if part == "*":
            a, b = lo, hi
        elif ".." in part:
            a_s, _, b_s = part.partition("..")
            a, b = _int(a_s, what, event), _int(b_s, what, event)
        else:
            a = _int(part, what, event)
            b = hi if step else a
        if not (lo <= a <= hi and lo <= b <= hi) or a > b:
            raise CalendarError(f"calendar event {event!r}: {what} {part!r} is outside "
                                f"{lo}..{hi}")
        values.update(range(a, b + 1, step or 1))
    return frozenset(values)


def _int(s: str, what: str, event: str) -> int:
    if not s.isdigit():
        raise CalendarError(f"calendar event {event!r}: {what}: {s!r} is not a number")
    return int(s)


def _weekdays(text: str, event: str) -> frozenset[int]:
    def day(s: str) -> int:
        s = s.lower()
        for names in (_DAYS, _LONG_DAYS):
            if s in names:
                return names.index(s)
        raise CalendarError(f"calendar event {event!r}: {s!r} is not a weekday")

    out: set[int] = set()
    for part in text.split(","):
        if ".." in part:
            a_s, _, b_s = part.partition("..")
            a, b = day(a_s), day(b_s)
            out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        else:
            out.add(day(part))
    return frozenset(out)


@dataclass(frozen=True)
class CalendarEvent:
    """A parsed calendar event; :meth:`next_after` is the whole scheduler interface."""

    text: str
    weekdays: frozenset[int]
    years: frozenset[int] | None  # None: any year
    months: frozenset[int]
    days: frozenset[int]
    hours: frozenset[int]
    minutes: frozenset[int]
    seconds: frozenset[int]

    def matches(self, t: dt.datetime) -> bool:
        return (self._date_ok(t.date()) and t.hour in self.hours and t.minute in self.minutes
                and t.second in self.seconds and t.microsecond == 0)

    def _date_ok(self, d: dt.date) -> bool:
        return ((self.years is None or d.year in self.years) and d.month in self.months
                and d.day in self.days and d.weekday() in self.weekdays)

    def next_after(self, now: dt.datetime) -> dt.datetime | None:
        """The first time strictly after *now* that matches, in *now*'s zone (``None``: never).
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        tz = now.tzinfo
        wall = now.replace(tzinfo=None, microsecond=0)
        day = wall.date()
        for i in range(_HORIZON_DAYS):
            d = day + dt.timedelta(days=i)
            if self.years is not None and d.year > max(self.years):
                return None
            if not self._date_ok(d):
                continue
            after = wall.time() if i == 0 else None
            t = self._first_time(after)
            if t is not None:
                return dt.datetime.combine(d, t).replace(tzinfo=tz)
        return None

    def _first_time(self, after: dt.time | None) -> dt.time | None:
        """The earliest matching time of day strictly after *after* (any time if None)."""
        for h in sorted(self.hours):
            if after is not None and h < after.hour:
                continue
            for m in sorted(self.minutes):
                if after is not None and (h, m) < (after.hour, after.minute):
                    continue
                for s in sorted(self.seconds):
                    t = dt.time(h, m, s)
                    if after is None or t > after:
                        return t
        return None

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=256)
def parse(text: str) -> CalendarEvent:
    """Parse *text* (CalendarError, exit 2, naming the event, if it is not valid). Events
    are immutable, so a parsed one is kept for the next caller."""
    event = text
    words = text.strip().split()
    if not words:
        raise CalendarError("calendar event: empty")
    if words[0].lower() in _SHORTHANDS:
        name = words[0].lower()
        wd, sdate, stime = _SHORTHANDS[name]
        if len(words) > 2 or (len(words) == 2 and name not in _TIME_ALLOWED):
            raise CalendarError(f"calendar event {event!r}: '{name}' takes "
                                f"{'an optional time' if name in _TIME_ALLOWED else 'nothing'}"
                                " after it")
        if len(words) == 2:
            stime = words[1]
        words = [w for w in (wd, sdate, stime) if w]
    weekdays = frozenset(range(7))
    if words and words[0][:1].isalpha():
        weekdays = _weekdays(words.pop(0), event)
    date: str | None = None
    time: str | None = None
    for w in words:
        if ":" in w and time is None:
            time = w
        elif "-" in w and date is None and time is None:
            date = w
        else:
            raise CalendarError(f"calendar event {event!r}: cannot read {w!r}")
    years: frozenset[int] | None = None
    months = days = None
    if date is not None:
        parts = date.split("-")
        if len(parts) == 2:
            parts = ["*", *parts]
        if len(parts) != 3:
            raise CalendarError(f"calendar event {event!r}: date {date!r} is not YYYY-MM-DD")
        if parts[0] != "*":
            years = _field(parts[0], 1970, 2199, "year", event)
        months = _field(parts[1], 1, 12, "month", event)
        days = _field(parts[2], 1, 31, "day", event)
    if time is None:
        time = "00:00:00" if date is not None or weekdays != frozenset(range(7)) else "*:*:*"
    tparts = time.split(":")
    if len(tparts) == 2:
        tparts.append("00")
    if len(tparts) != 3 or not all(tparts):
        raise CalendarError(f"calendar event {event!r}: time {time!r} is not HH:MM[:SS]")
    ev = CalendarEvent(
        text=text, weekdays=weekdays, years=years,
        months=months if months is not None else frozenset(range(1, 13)),
        days=days if days is not None else frozenset(range(1, 32)),
        hours=_field(tparts[0], 0, 23, "hour", event),
        minutes=_field(tparts[1], 0, 59, "minute", event),
        seconds=_field(tparts[2], 0, 59, "second", event),
    )
    probe = dt.datetime(min(ev.years) - 1 if ev.years else 2000, 12, 31, tzinfo=dt.UTC)
    if ev.next_after(probe) is None:
        raise CalendarError(f"calendar event {event!r}: never elapses")
    return ev
