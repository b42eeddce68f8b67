"""A bandwidth limit as a backend wrapper (modelled on kopia's ``blob/throttling``).

``ThrottlingBackend`` charges the bytes of every ``get``/``get_range`` result and every
``put`` against a :class:`TokenBucket`. Several wrappers may share one bucket, so that a
copy between two remote repositories stays under one budget. Metadata calls (``stat``,
``list``, ``delete``) are not charged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vmdr.errors import UsageError
from vmdr.storage.base import Backend
from vmdr.storage.wrappers import DelegatingBackend

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
