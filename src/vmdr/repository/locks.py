"""Repository locks kept as objects under ``locks/`` (format.md §8).

Shared locks for backup/restore/copy/check, exclusive for prune/forget/key changes.
A lock is refreshed by a background thread; a lock not refreshed for ``STALE_AFTER``
or naming a dead pid on this host is stale and ignored.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from vmdr.errors import ObjectNotFound, RepositoryLocked, StorageError
from vmdr.procutil import pid_alive
from vmdr.storage.base import Backend
from vmdr.timeutil import Clock, format_time, parse_time, utcnow

log = logging.getLogger(__name__)
STALE_AFTER = timedelta(minutes=30)
REFRESH_EVERY = 300.0


@dataclass(frozen=True)
class LockInfo:
    name: str
    host: str
    pid: int
    exclusive: bool
    created: datetime
    refreshed: datetime
    command: str

    def is_stale(self, now: datetime, hostname: str) -> bool:
        if now - self.refreshed > STALE_AFTER:
            return True
        if self.host == hostname:
            return not pid_alive(self.pid)
        return False

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return (f"{kind} lock by {self.command or 'vmdr'} (pid {self.pid} on {self.host}, "
                f"since {format_time(self.created)[:19]})")




def list_locks(backend: Backend) -> list[LockInfo]:
    out = []
    for obj in backend.list("locks"):
        try:
            d = json.loads(backend.get(obj.name))
            out.append(LockInfo(
                obj.name, str(d["host"]), int(d["pid"]), bool(d["exclusive"]),
                parse_time(d["created"]), parse_time(d["refreshed"]), str(d.get("command", "")),
            ))
        except ObjectNotFound:
            continue
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable lock %s", obj.name)
    return out


class Lock:
    """A held lock. Use as a context manager or call ``release``."""

    def __init__(
        self, backend: Backend, exclusive: bool, command: str = "",
        clock: Clock = utcnow, hostname: str | None = None,
    ) -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.command = command
        self.clock = clock
        self.hostname = hostname or socket.gethostname()
        self.name = f"locks/{secrets.token_hex(8)}"
        self.created = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        doc = {"host": self.hostname, "pid": os.getpid(), "exclusive": self.exclusive,
               "created": format_time(self.created), "refreshed": format_time(self.clock()),
               "command": self.command}
        self.backend.put(self.name, json.dumps(doc).encode())

    def _conflicts(self) -> list[LockInfo]:
        now = self.clock()
        out = []
        for li in list_locks(self.backend):
            if li.name == self.name or li.is_stale(now, self.hostname):
                continue
            if self.exclusive or li.exclusive:
                out.append(li)
        return out

    def acquire(self, wait: float = 0.0, attempts: int = 5) -> Lock:
        deadline = time.monotonic() + wait
        while True:
            conflicts = self._conflicts()
            if not conflicts:
                self._write()
                conflicts = self._conflicts()
                if not conflicts:
                    break
                self._remove()
            attempts -= 1
            if time.monotonic() >= deadline and attempts <= 0:
                raise RepositoryLocked(
                    f"repository is locked: {conflicts[0].describe()}; "
                    "if that process is gone, run 'vmdr repo unlock'"
                )
            time.sleep(random.uniform(0.05, 0.5))
        self._thread = threading.Thread(target=self._refresher, name="vmdr-lock", daemon=True)
        self._thread.start()
        return self

    def _refresher(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self._write()
            except StorageError as exc:
                log.warning("could not refresh repository lock: %s", exc.message)

    def _remove(self) -> None:
        try:
            self.backend.delete(self.name)
        except ObjectNotFound:
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self._remove()
        except StorageError as exc:
            log.warning("could not remove repository lock %s: %s", self.name, exc.message)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def unlock(backend: Backend, remove_all: bool = False, clock: Clock = utcnow) -> list[LockInfo]:
    """Remove stale locks (or all with *remove_all*); return what was removed."""
    now, host = clock(), socket.gethostname()
    removed = []
    for li in list_locks(backend):
        if remove_all or li.is_stale(now, host):
            try:
                backend.delete(li.name)
            except ObjectNotFound:
                pass
            removed.append(li)
    return removed
