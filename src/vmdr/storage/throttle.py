"""A bandwidth limit as a backend wrapper (modelled on kopia's ``blob/throttling``).

``ThrottlingBackend`` charges the bytes of every ``get``/``get_range`` result and every
``put`` against a :class:`TokenBucket`. Several wrappers may share one bucket, so that a
copy between two remote repositories stays under one budget. Metadata calls (``stat``,
``list``, ``delete``) are not charged.

Bandwidth windows (:class:`Windows`, :class:`WindowedBucket`) make the rate a function of
the local time: ``mon..fri 08:00..18:00 20M; * 100M``. The agent passes a policy's
``bandwidth`` rules to its backup and copy jobs as ``--bwlimit``.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmdr.errors import UsageError
from vmdr.storage.base import Backend
from vmdr.storage.wrappers import DelegatingBackend
from vmdr.timeutil import utcnow

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_rate(text: str) -> int:
    """``10M`` → 10485760 bytes/s. Accepts ``K``, ``M``, ``G`` (binary), optional ``B``,
    ``iB`` and ``/s`` suffixes."""
    t = text.strip().lower().removesuffix("/s").removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise UsageError(f"invalid rate {text!r} (e.g. 10M for 10 MiB/s)") from None
    rate = int(value * _UNITS[unit])
    if rate < 1024:
        raise UsageError(f"rate {text!r} is too low (at least 1K, i.e. 1 KiB/s)")
    return rate


class TokenBucket:
    """*rate* bytes per second with a burst of *burst* bytes; thread-safe.

    A request larger than the burst is allowed but leaves the bucket in debt, so the
    long-run average never exceeds *rate*. ``clock`` and ``sleep`` are parameters so tests
    run without waiting.
    """

    def __init__(
        self, rate: int, burst: int | None = None,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(64 << 10, rate // 4))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Charge *n* bytes; sleep as long as needed. Returns the time slept."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class ThrottlingBackend(DelegatingBackend):
    """Limit the data bytes moved through *inner* to the rate of *bucket*."""

    def __init__(self, inner: Backend, bucket: TokenBucket) -> None:
        super().__init__(inner)
        self.bucket = bucket

    def get(self, name: str) -> bytes:
        data = self.inner.get(name)
        self.bucket.take(len(data))
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(name, offset, length)
        self.bucket.take(len(data))
        return data

    def put(self, name: str, data: bytes) -> None:
        self.bucket.take(len(data))
        self.inner.put(name, data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        self.bucket.take(len(data))
        return self.inner.put_if_absent(name, data)


# -- bandwidth windows ------------------------------------------------------------------------
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK = re.compile(r"^([01]?\d|2[0-4])(?::([0-5]\d))?$")
_RANGE = re.compile(r"^(\d{1,2}(?::\d\d)?)(?:\.\.|-)(\d{1,2}(?::\d\d)?)$")


@dataclass(frozen=True)
class Window:
    """One rule: on *days* (0 = Monday), from *start* to *end* (minutes of the day; an
    end before the start runs past midnight into the next day), at most *rate* bytes/s
    (None: unlimited)."""

    days: frozenset[int]
    start: int
    end: int
    rate: int | None
    text: str

    def covers(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        if self.start == self.end:  # the whole day
            return day in self.days
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


def _days(text: str, rule: str) -> frozenset[int]:
    if text == "*":
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.lower().split(","):
        a, sep, b = part.partition("..")
        try:
            i, j = _DAYS.index(a[:3]), _DAYS.index((b if sep else a)[:3])
        except ValueError:
            raise UsageError(f"bandwidth window {rule!r}: {part!r} is not a day or range of "
                             "days (mon..fri, sat,sun, *)") from None
        out.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
    return frozenset(out)


def _clock(text: str, rule: str) -> int:
    m = _CLOCK.match(text)
    if not m or (int(m[1]) == 24 and (m[2] or "00") != "00"):
        raise UsageError(f"bandwidth window {rule!r}: {text!r} is not a time HH:MM")
    return int(m[1]) * 60 + int(m[2] or 0)


def parse_window(rule: str) -> Window:
    """``[DAYS] [HH:MM..HH:MM] RATE``: ``mon..fri 08:00..18:00 20M``, ``sat,sun 5M``,
    ``22:00..06:00 unlimited``, ``* 100M``, ``50M``. RATE as :func:`parse_rate`, or
    ``unlimited``. Proxmox Backup Server's timeframe form is read too:
    ``mon..fri 8-12``, ``14:30-18``."""
    words = rule.split()
    if not words or len(words) > 3:
        raise UsageError(f"bandwidth window {rule!r}: expected [DAYS] [HH:MM..HH:MM] RATE, "
                         "e.g. 'mon..fri 08:00..18:00 20M'")
    rate = None if words[-1].lower() in ("unlimited", "off") else parse_rate(words[-1])
    days, start, end = frozenset(range(7)), 0, 0
    for w in words[:-1]:
        if m := _RANGE.match(w):
            start, end = _clock(m[1], rule), _clock(m[2], rule) % 1440
        else:
            days = _days(w, rule)
    return Window(days, start, end, rate, rule.strip())


class Windows:
    """Rules tried in order; the first that covers the local time gives the rate, and no
    rule covering it means unlimited."""

    def __init__(self, rules: list[str]) -> None:
        if not rules:
            raise UsageError("bandwidth: give at least one rule, e.g. '* 100M'")
        self.rules = [parse_window(r) for r in rules]

    @classmethod
    def parse(cls, text: str) -> Windows:
        """The command-line form: rules separated by ``;``."""
        return cls([r for r in text.split(";") if r.strip()])

    def rate_at(self, when: dt.datetime) -> int | None:
        for w in self.rules:
            if w.covers(when):
                return w.rate
        return None

    def __str__(self) -> str:
        return "; ".join(w.text for w in self.rules)


class WindowedBucket(TokenBucket):
    """A :class:`TokenBucket` whose rate follows *windows* by the local time, checked at
    most once a second: a long copy slows down when a business-hours window opens and
    speeds up when it closes. An unlimited window charges nothing."""

    def __init__(self, windows: Windows,
                 now: Callable[[], dt.datetime] = lambda: utcnow().astimezone(),
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.windows, self._now = windows, now
        super().__init__(1 << 20, clock=clock, sleep=sleep)
        self.current: int | None = None
        self._checked = float("-inf")
        self._refresh(clock())

    def _refresh(self, mono: float) -> None:
        self._checked = mono
        rate = self.windows.rate_at(self._now())
        if rate == self.current:
            return
        with self._lock:
            self.current = rate
            if rate is not None:
                self.rate = float(rate)
                self.burst = float(max(64 << 10, rate // 4))
                self._tokens = min(self._tokens, self.burst)

    def take(self, n: int) -> float:
        mono = self._clock()
        if mono - self._checked >= 1.0:
            self._refresh(mono)
        if self.current is None:
            return 0.0
        return super().take(n)


def bucket_for(text: str) -> TokenBucket:
    """``--bwlimit``: a plain rate (``10M``) or bandwidth windows
    (``mon..fri 08:00..18:00 20M; * 100M``)."""
    if ";" in text or len(text.split()) > 1 or text.strip().lower() in ("unlimited", "off"):
        return WindowedBucket(Windows.parse(text))
    return TokenBucket(parse_rate(text))
