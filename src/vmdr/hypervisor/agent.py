"""QEMU guest agent: ping, fsfreeze and fsthaw, each with a bounded timeout."""

from __future__ import annotations

import json
from typing import Any

from vmdr.errors import GuestAgentUnavailable, HypervisorError

from ._compat import lv, lvq
from .errors import translate


def command(dom: Any, execute: str, timeout: int, arguments: dict[str, Any] | None = None) -> Any:
    """Run one guest agent command; its ``return`` value (translated errors)."""
    cmd: dict[str, Any] = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    try:
        reply = lvq().qemuAgentCommand(dom, json.dumps(cmd), int(timeout), 0)
    except lv().libvirtError as exc:
        err = translate(exc, f"guest agent {execute}")
        if isinstance(err, GuestAgentUnavailable):
            raise err from exc
        raise GuestAgentUnavailable(err.message) from exc
    try:
        return json.loads(reply).get("return") if reply else None
    except ValueError as exc:
        raise HypervisorError(f"guest agent {execute}: bad reply {reply!r}") from exc


def ping(dom: Any, timeout: int = 3) -> bool:
    """True if the guest agent answers ``guest-ping`` within ``timeout`` seconds."""
    try:
        command(dom, "guest-ping", timeout)
    except HypervisorError:
        return False
    return True


def freeze(dom: Any, timeout: int = 60) -> int:
    """Freeze guest filesystems; the number frozen (raises GuestAgentUnavailable)."""
    result = command(dom, "guest-fsfreeze-freeze", timeout)
    return int(result) if isinstance(result, int) else 0


def thaw(dom: Any, timeout: int = 30) -> None:
    """Thaw guest filesystems; tries libvirt's fsThaw and then the raw agent command."""
    try:
        dom.fsThaw(None, 0)
        return
    except lv().libvirtError:
        pass
    command(dom, "guest-fsfreeze-thaw", timeout)


def frozen(dom: Any, timeout: int = 5) -> bool:
    """True if the agent reports frozen filesystems (False when it cannot tell)."""
    try:
        return bool(command(dom, "guest-fsfreeze-status", timeout) == "frozen")
    except HypervisorError:
        return False
