"""Cross-cutting behaviour as wrappers around a backend: retry and a concurrency limit.

``wrap(backend)`` applies the standard stack used by every command.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from vmdr.errors import TransientStorageError
from vmdr.storage.base import Backend, ObjectInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


class DelegatingBackend(Backend):
    """Passes every call to *inner* through ``_call``; a wrapper overrides ``_call`` or
    just the methods whose behaviour it changes."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.display_url = inner.display_url

    def _call(self, fn: Callable[[], T]) -> T:
        return fn()

    def create(self) -> None:
        self._call(self.inner.create)

    def get(self, name: str) -> bytes:
        return self._call(lambda: self.inner.get(name))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self._call(lambda: self.inner.get_range(name, offset, length))

    def put(self, name: str, data: bytes) -> None:
        self._call(lambda: self.inner.put(name, data))

    def put_if_absent(self, name: str, data: bytes) -> bool:
        return self._call(lambda: self.inner.put_if_absent(name, data))

    def delete(self, name: str) -> None:
        self._call(lambda: self.inner.delete(name))

    def stat(self, name: str) -> ObjectInfo:
        return self._call(lambda: self.inner.stat(name))

    def exists(self, name: str) -> bool:
        return self._call(lambda: self.inner.exists(name))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Listings are materialised so that a retry restarts cleanly.
        return iter(self._call(lambda: list(self.inner.list(prefix))))

    def list_temporary(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(self._call(lambda: list(self.inner.list_temporary(prefix))))

    def close(self) -> None:
        self.inner.close()


class RetryingBackend(DelegatingBackend):
    """Retry ``TransientStorageError`` with exponential backoff and full jitter.

    Permanent errors (not found, authentication, no space, anything else) pass through
    at once. ``sleep`` and ``rng`` are parameters so tests run without waiting.
    """

    def __init__(
        self,
        inner: Backend,
        attempts: int = 6,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._rng = rng or random.Random()

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientStorageError as exc:
                if attempt == self.attempts:
                    raise
                delay = self._rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
                log.warning(
                    "storage: %s (attempt %d/%d, retrying in %.1fs)",
                    exc.message, attempt, self.attempts, delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")


class LimitingBackend(DelegatingBackend):
    """Allow at most *limit* backend calls in flight at once."""

    def __init__(self, inner: Backend, limit: int) -> None:
        super().__init__(inner)
        self._sem = threading.BoundedSemaphore(limit)

    def _call(self, fn: Callable[[], T]) -> T:
        with self._sem:
            return fn()


def wrap(backend: Backend, connections: int = 8) -> Backend:
    """The standard stack: concurrency limit inside, retry outside."""
    return RetryingBackend(LimitingBackend(backend, connections))
