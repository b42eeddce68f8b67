"""A bounded buffer between the repository reader and the drive, so a slow moment on
either side does not stop the tape (shoe-shining): a producer thread reads ahead up to
*capacity* bytes while the drive writes."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RingBuffer(Generic[T]):
    def __init__(self, source: Iterable[T], size_of: Callable[[T], int],
                 capacity: int = 256 << 20) -> None:
        self._source = source
        self._size_of = size_of
        self._capacity = capacity
        self._items: deque[T] = deque()
        self._bytes = 0
        self._done = False
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition()
        self.stalls = 0  # times the drive side found the buffer empty
        self._thread = threading.Thread(target=self._fill, name="vmdr-tape-ring", daemon=True)

    def _fill(self) -> None:
        try:
            for item in self._source:
                n = self._size_of(item)
                with self._cv:
                    while self._bytes > 0 and self._bytes + n > self._capacity and not self._stop:
                        self._cv.wait()
                    if self._stop:
                        return
                    self._items.append(item)
                    self._bytes += n
                    self._cv.notify_all()
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()

    def __iter__(self) -> Iterator[T]:
        self._thread.start()
        try:
            while True:
                with self._cv:
                    if not self._items and not self._done:
                        self.stalls += 1
                    while not self._items and not self._done:
                        self._cv.wait()
                    if self._items:
                        item = self._items.popleft()
                        self._bytes -= self._size_of(item)
                        self._cv.notify_all()
                    elif self._error is not None:
                        raise self._error
                    else:
                        return
                yield item
        finally:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
