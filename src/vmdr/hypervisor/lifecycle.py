"""Define, start and stop domains, and wait for a restored guest to show signs of life."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from vmdr.errors import HeartbeatTimeout, HypervisorError

from . import agent
from ._compat import lv
from .errors import libvirt_errors


def define(conn: Any, xml: str) -> str:
    """Define (persist) a domain; its name."""
    with libvirt_errors("defining domain"):
        return str(conn.defineXML(xml).name())


def start(dom: Any) -> None:
    """Start a defined domain."""
    with libvirt_errors(f"starting {dom.name()}"):
        dom.create()


def destroy(dom: Any) -> None:
    """Power a domain off hard (no error if it is not running)."""
    with libvirt_errors(f"stopping {dom.name()}"):
        if dom.isActive():
            dom.destroy()


def undefine(dom: Any) -> None:
    """Remove a domain definition with its NVRAM and checkpoint metadata."""
    m = lv()
    flags = (m.VIR_DOMAIN_UNDEFINE_NVRAM | m.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
             | m.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    with libvirt_errors(f"undefining {dom.name()}"):
        dom.undefineFlags(flags)


def _console_matches(path: str, pattern: re.Pattern[str]) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return pattern.search(f.read()) is not None
    except FileNotFoundError:
        return False


def wait_heartbeat(
    dom: Any,
    *,
    agent_ping: bool = True,
    console_pattern: str | None = None,
    console_log: str | None = None,
    timeout: float = 300.0,
    poll: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Seconds until the guest agent answers or ``console_pattern`` shows in ``console_log``."""
    if not agent_ping and not (console_pattern and console_log):
        raise ValueError("wait_heartbeat needs agent_ping or console_pattern + console_log")
    pattern = re.compile(console_pattern) if console_pattern else None
    t0 = clock()
    while True:
        with libvirt_errors("checking domain"):
            if not dom.isActive():
                raise HypervisorError(f"{dom.name()} stopped before its heartbeat")
        if pattern is not None and console_log and _console_matches(console_log, pattern):
            return clock() - t0
        if agent_ping and agent.ping(dom, timeout=max(1, int(min(poll * 2, 5)))):
            return clock() - t0
        if clock() - t0 > timeout:
            raise HeartbeatTimeout(f"{dom.name()}: no heartbeat within {timeout:.0f}s")
        sleep(poll)
