"""Process helpers shared by every layer."""

from __future__ import annotations

import contextlib
import os
import select
import signal


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (EPERM counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def same_process(pid: int, start: str | None) -> bool:
    """Whether ``pid`` is still the process that had start time ``start`` (alive and not
    a later process that reused the number). ``start`` None: alive is all we know."""
    if not pid_alive(pid):
        return False
    now = proc_start_time(pid)
    return start is None or now is None or now == start


class Pinned:
    """A process pinned when it was found, so a signal can never reach a later process that
    reused its pid: a pidfd where the kernel has them (Linux 5.3+), else the pid with its
    start time, checked again right before each signal. Close it when done."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self.fd = os.pidfd_open(pid)
        self.start = proc_start_time(pid)

    def alive(self) -> bool:
        """True until the pinned process has exited (a zombie counts as exited)."""
        if self.fd is not None:
            return not select.select([self.fd], [], [], 0)[0]
        if not same_process(self.pid, self.start):
            return False
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii", errors="replace") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the pinned process; False if it is gone (nothing else gets it)."""
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
                return True
            if self.start is None or proc_start_time(self.pid) != self.start:
                return False
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
