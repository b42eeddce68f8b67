"""Fencing: a host that may have lost its lease makes sure its HA VMs are gone.

Three layers (docs/operations.md, "High availability: host failure"):

1. **Self-fencing** (always; the one the safety argument rests on): :class:`SelfFence`
   decides, from the monotonic time at which the last successful lease renewal was
   *sent*, when the agent must destroy its own HA VMs — ``lease_ttl − self_fence_margin``
   after it, strictly before etcd can expire the lease (the timing argument is in
   :mod:`vmdr.ha.settings`). The agent checks it every 0.1 s in a thread of its own, so a
   renewal stuck on an unreachable etcd never delays it.
2. **Hardware watchdog** (where ``/dev/watchdog`` exists): :class:`Watchdog` is armed
   with a timeout of ``lease_ttl − self_fence_margin`` and petted after each successful
   renewal only. If the agent hangs (or the kernel does), the board resets the host before
   the lease expires. Stopping cleanly writes the magic ``V`` (disarm). *Tested here with
   a regular file standing in for the device; never run on a hardware watchdog.*
3. **fence_command** (optional, run by the leader): a fence-agents command line such as
   ``fence_ipmilan --ip=bmc-{host} --username=admin --password-file=/etc/vmdr/ipmi
   --action=off`` — :func:`run_fence_command`. Its failure is logged and recorded, never
   waited for: the BMC may have died with its host, and the lease expiry alone suffices.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import struct
import subprocess
from dataclasses import dataclass

from vmdr.ha.failover import must_self_fence
from vmdr.ha.settings import HASettings

__all__ = ["FenceResult", "SelfFence", "Watchdog", "run_fence_command"]

log = logging.getLogger("vmdr.ha")

# linux/watchdog.h: _IOWR('W', 6, int) and _IOR('W', 5, int)
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_KEEPALIVE = 0x80045705


class SelfFence:
    """When to destroy this host's HA VMs; pure, driven by monotonic times.

    ``renewed(sent)`` after each successful renewal (``sent``: when it was sent);
    ``due(now)``: True while the host must be fenced (no renewal for too long). The first
    ``due`` after a renewal starts a *fencing episode* (``episode`` counts them), so the
    agent can report it once when it reaches etcd again.
    """

    def __init__(self, settings: HASettings, started: float) -> None:
        self.settings = settings
        # before any renewal the host holds no lease and runs nothing for HA: counting
        # from start-up keeps a host that never reaches etcd from running HA VMs long
        self.last_sent = started
        self.fenced = False
        self.episode = 0
        self.fenced_at: float | None = None

    def renewed(self, sent: float) -> None:
        if sent > self.last_sent:
            self.last_sent = sent
            self.fenced = False

    def due(self, now: float) -> bool:
        if must_self_fence(self.settings, self.last_sent, now):
            if not self.fenced:
                self.fenced, self.fenced_at = True, now
                self.episode += 1
            return True
        return False

    @property
    def deadline(self) -> float:
        return self.last_sent + self.settings.self_fence_after


class Watchdog:
    """A Linux watchdog device, armed while the lease is held.

    ``arm()`` opens it (which starts the countdown) and sets the timeout; ``pet()`` after
    each successful renewal; ``disarm()`` on a clean stop (magic close). A missed pet for
    ``timeout`` seconds resets the host. On a regular file (tests) the ioctls are skipped.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = max(1, int(timeout))  # the kernel takes whole seconds, rounded down
        self.fd: int | None = None
        self.pets = 0

    @staticmethod
    def available(path: str = "/dev/watchdog") -> bool:
        return os.path.exists(path)

    def _ioctl(self, req: int, value: int) -> int | None:
        assert self.fd is not None
        try:
            buf = fcntl.ioctl(self.fd, req, struct.pack("i", value))
            return int(struct.unpack("i", buf)[0])
        except OSError:  # a regular file (tests), or a driver without that call
            return None

    def arm(self) -> None:
        if self.fd is not None:
            return
        self.fd = os.open(self.path, os.O_WRONLY)
        got = self._ioctl(WDIOC_SETTIMEOUT, self.timeout)
        if got is not None and got != self.timeout:
            log.warning("watchdog %s: asked for a %ds timeout, the driver set %ds",
                        self.path, self.timeout, got)
        log.info("watchdog %s armed (%ds)", self.path, self.timeout)
        self.pet()

    def pet(self) -> None:
        if self.fd is None:
            return
        os.write(self.fd, b"\0")
        self.pets += 1

    def disarm(self) -> None:
        """Clean stop: the magic close tells the driver not to reset the host."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, b"V")
        os.close(self.fd)
        self.fd = None
        log.info("watchdog %s disarmed", self.path)

    def abandon(self) -> None:
        """Stop petting without the magic close: the host resets at the timeout (used when
        this agent fences itself but cannot be sure its VMs are gone)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class FenceResult:
    ok: bool
    command: list[str]
    output: str


def run_fence_command(template: str, host: str, timeout: float = 30.0) -> FenceResult:
    """Run the fence-agents style command for *host* (``{host}`` is replaced; split like
    a shell would, never run through one). Exit 0 = the host is fenced."""
    argv = [a.replace("{host}", host) for a in shlex.split(template)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return FenceResult(False, argv, str(exc))
    out = (p.stdout + p.stderr).strip()[-500:]
    return FenceResult(p.returncode == 0, argv, out or f"exit {p.returncode}")
