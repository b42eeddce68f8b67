"""The per-VM lock: never two backups of one VM at once (the seed's ``.lock``).

An ``flock`` on a file under ``/run/vmdr/locks`` (or ``$VMDR_LOCK_DIR``): the kernel drops
it when the process dies, even by ``kill -9``, so a lock can never go stale.

The file is removed on release, so names that never matched a VM leave nothing behind.
Removing a lock file is safe because a taker checks, once it holds the ``flock``, that
the path still names the file it locked; if a releaser unlinked it in between, it tries
again with a fresh file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from types import TracebackType

from vmdr.errors import VMLocked


def lock_dir() -> str:
    return os.environ.get("VMDR_LOCK_DIR", "/run/vmdr/locks")


class VMLock:
    def __init__(self, uri: str, vm: str) -> None:
        key = hashlib.sha256(f"{uri}\0{vm}".encode()).hexdigest()[:16]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in vm)[:64]
        self.path = os.path.join(lock_dir(), f"{safe}-{key}.lock")
        self.vm = vm
        self.fd: int | None = None

    def acquire(self) -> VMLock:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise VMLocked(f"{self.vm}: another vmdr job is backing it up"
                               + (f" (pid {holder})" if holder else "")) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed while we waited: lock the new file
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still holding the lock (see the docstring)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> VMLock:
        return self.acquire()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
