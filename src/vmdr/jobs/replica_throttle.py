"""``vmdr replicate --bwlimit``: the rate limit of a replica cycle and of a live mirror.

A snapshot cycle charges every changed piece it writes into a standby disk against the
same :class:`~vmdr.storage.throttle.TokenBucket` ``vmdr copy`` and ``vmdr backup`` use
(a plain rate, or a :class:`~vmdr.storage.throttle.WindowedBucket` that follows bandwidth
windows by the clock). The bytes charged are the data before vmdr's zstd, so the link
carries at most the limit; zeroed ranges are a few bytes on the wire and are not charged.

A live mirror is copied by QEMU, not by vmdr: its cap is libvirt's block-job bandwidth
(:class:`MirrorBandwidth`), set when the block copy starts and changed with
``blockJobSetSpeed`` when a window opens or closes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from vmdr.storage.throttle import TokenBucket, Windows
from vmdr.timeutil import utcnow

W = TypeVar("W")


class _Throttled:
    """A standby-disk writer whose ``write`` first takes its bytes from a bucket."""

    def __init__(self, inner: Any, bucket: TokenBucket) -> None:
        self._inner, self._bucket = inner, bucket

    def write(self, offset: int, data: bytes) -> None:
        self._bucket.take(len(data))
        self._inner.write(offset, data)

    def __getattr__(self, name: str) -> Any:  # zero, read, close, path, where...
        return getattr(self._inner, name)


def throttled(writer: W, bucket: TokenBucket | None) -> W:
    """*writer* (a standby disk's writer), its data writes limited by *bucket* (None: as
    it is)."""
    if bucket is None:
        return writer
    return cast(W, _Throttled(writer, bucket))


def local_now() -> dt.datetime:
    return utcnow().astimezone()


class MirrorBandwidth:
    """The block-job bandwidth of a mirror's disks, following *windows* by the local time.

    The rate of the window in force is split evenly over the mirrored disks (libvirt's
    cap is per block job), so their sum stays under it; 0 means unlimited to libvirt.
    """

    def __init__(self, windows: Windows, now: Callable[[], dt.datetime] = local_now) -> None:
        self.windows, self._now = windows, now
        self.applied: int | None = None  # bytes/s per disk last set (0: unlimited)

    def rate(self) -> int | None:
        """The whole mirror's rate now (None: unlimited)."""
        return self.windows.rate_at(self._now())

    def per_disk(self, disks: int) -> int:
        """Bytes/s for each of *disks* block jobs now (0: unlimited)."""
        rate = self.rate()
        if rate is None:
            return 0
        return max(1024, rate // max(1, disks))

    def start(self, disks: int) -> int:
        """The bandwidth to start each block copy with."""
        self.applied = self.per_disk(disks)
        return self.applied

    def follow(self, jobs: Iterable[Any]) -> int | None:
        """Set every job's speed when the window changed since the last call; the new
        per-disk rate, or None when nothing changed."""
        jobs = list(jobs)
        want = self.per_disk(len(jobs))
        if want == self.applied:
            return None
        for job in jobs:
            job.set_speed(want)
        self.applied = want
        return want
