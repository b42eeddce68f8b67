"""Heartbeat checks on a booted sandbox: guest agent, console pattern, TCP ports, scripts.

Each check ends as a :class:`Check` (``passed`` / ``failed`` / ``skipped``) with the
seconds it took since the domain started. TCP port checks need the guest's address,
which only exists when the sandbox has a NIC on an isolated network (``verify_network``)
and the guest agent or the network's DHCP reports it; without one they are skipped.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmdr.hypervisor import Domain

Clock = Callable[[], float]


@dataclass
class Check:
    name: str
    status: str  # passed | failed | skipped
    seconds: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status,
                "seconds": None if self.seconds is None else round(self.seconds, 3),
                "detail": self.detail}


def _console_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _tail(text: str, n: int = 160) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:n]


# Console lines after which no guest recovers by itself: fail at once, not at the timeout.
FATAL_CONSOLE = r"No bootable device|Kernel panic - not syncing"


def wait_heartbeats(
    dom: Domain, *, t0: float, deadline: float, agent_ping: bool, console_pattern: str | None,
    console_log: str, clock: Clock = time.monotonic, poll: float = 1.0,
    fatal_pattern: str | None = FATAL_CONSOLE,
) -> list[Check]:
    """Wait (until *deadline*) for every configured heartbeat; one Check each. A console
    line matching *fatal_pattern* fails the ones still pending at once."""
    fatal = re.compile(fatal_pattern, re.M) if fatal_pattern else None
    pending: dict[str, Callable[[], bool]] = {}
    if agent_ping:
        pending["agent"] = lambda: dom.guest_ping(timeout=2)
    if console_pattern:
        rx = re.compile(console_pattern, re.M)
        pending["console"] = lambda: rx.search(_console_text(console_log)) is not None
    done: dict[str, Check] = {}
    while pending:
        for name, probe in list(pending.items()):
            if probe():
                done[name] = Check(name, "passed", clock() - t0)
                del pending[name]
        if not pending:
            break
        stopped = not dom.is_active()
        m = fatal.search(_console_text(console_log)) if fatal else None
        if stopped or m or clock() > deadline:
            why = ("the domain stopped" if stopped else f"the console shows {m.group(0)!r}"
                   if m else f"no answer within {deadline - t0:.0f}s")
            tail = _tail(_console_text(console_log))
            for name in pending:
                extra = f"; console ends {tail!r}" if tail else "; console is empty"
                done[name] = Check(name, "failed", clock() - t0, why + extra)
            break
        time.sleep(poll)
    order = ["agent", "console"]
    return [done[n] for n in order if n in done]


def check_ports(
    dom: Domain, ports: list[int], *, t0: float, deadline: float, has_network: bool,
    clock: Clock = time.monotonic,
) -> list[Check]:
    if not ports:
        return []
    if not has_network:
        return [Check(f"port:{p}", "skipped", None, "no network attached (set "
                      "verify_network to an isolated libvirt network)") for p in ports]
    out = []
    addrs: list[str] = []
    for port in ports:
        ok = False
        while clock() <= deadline and not ok:
            addrs = addrs or dom.guest_addresses()
            for a in addrs:
                try:
                    with socket.create_connection((a, port), timeout=2):
                        ok = True
                        break
                except OSError:
                    continue
            if not ok:
                time.sleep(1)
        detail = f"{addrs[0]}:{port}" if addrs else "the guest reported no IPv4 address"
        out.append(Check(f"port:{port}", "passed" if ok else "failed", clock() - t0, detail))
    return out


def run_script(path: str, env: dict[str, str], timeout: float, t0: float,
               clock: Clock = time.monotonic) -> Check:
    """Run a user test script; exit 0 passes. Its last output line is the detail."""
    name = f"script:{os.path.basename(path)}"
    try:
        p = subprocess.run([path], env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=max(1.0, timeout), check=False)
    except subprocess.TimeoutExpired:
        return Check(name, "failed", clock() - t0, f"timed out after {timeout:.0f}s")
    except OSError as exc:
        return Check(name, "failed", clock() - t0, f"cannot run {path}: {exc.strerror}")
    tail = _tail(p.stdout + "\n" + p.stderr)
    if p.returncode == 0:
        return Check(name, "passed", clock() - t0, tail)
    return Check(name, "failed", clock() - t0, f"exit {p.returncode}: {tail}")
