"""A backend that fails on purpose, for fault-injection tests (modelled on kopia's
``blobtesting/faulty.go``). Rules are matched in order against each call; a matching
rule raises its exception (or runs its callback) instead of, or before, the real call.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vmdr.storage.base import Backend, ObjectInfo


@dataclass
class Fault:
    method: str  # "get", "put", "delete", "stat", "list", "exists", "*"
    pattern: str = "*"  # fnmatch pattern on the object name / prefix
    error: Exception | None = None
    times: int = -1  # how many times to fire; -1 forever
    after: int = 0  # let this many matching calls pass first
    callback: Callable[[str], None] | None = None
    seen: int = field(default=0, init=False)


class FaultyBackend(Backend):
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.display_url = inner.display_url
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def _check(self, method: str, name: str) -> None:
        with self._lock:
            self.calls.append((method, name))
            for f in self.faults:
                if f.method not in ("*", method) or not fnmatch.fnmatch(name, f.pattern):
                    continue
                f.seen += 1
                if f.seen <= f.after or f.times == 0:
                    continue
                if f.times > 0:
                    f.times -= 1
                if f.callback:
                    f.callback(name)
                if f.error is not None:
                    raise f.error
                return

    def create(self) -> None:
        self._check("create", "")
        self.inner.create()

    def get(self, name: str) -> bytes:
        self._check("get", name)
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self._check("get", name)
        return self.inner.get_range(name, offset, length)

    def put(self, name: str, data: bytes) -> None:
        self._check("put", name)
        self.inner.put(name, data)

    def delete(self, name: str) -> None:
        self._check("delete", name)
        self.inner.delete(name)

    def stat(self, name: str) -> ObjectInfo:
        self._check("stat", name)
        return self.inner.stat(name)

    def exists(self, name: str) -> bool:
        self._check("exists", name)
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._check("list", prefix)
        return self.inner.list(prefix)

    def list_temporary(self, prefix: str) -> Iterator[ObjectInfo]:
        self._check("list", prefix)
        return self.inner.list_temporary(prefix)

    def close(self) -> None:
        self.inner.close()
