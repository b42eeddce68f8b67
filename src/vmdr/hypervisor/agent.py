"""QEMU guest agent: ping, fsfreeze and fsthaw, each with a bounded timeout."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from vmdr.errors import GuestAgentUnavailable, HypervisorError

from ._compat import lv, lvq
from .driver import GuestExecResult
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


def _text(b64: Any) -> str:
    if not isinstance(b64, str) or not b64:
        return ""
    return base64.b64decode(b64).decode("utf-8", errors="replace")


def execute(dom: Any, argv: Sequence[str], timeout: float = 30.0, *, capture: bool = True,
            poll: float = 0.2, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> GuestExecResult:
    """``guest-exec`` of ``argv`` in the guest, then ``guest-exec-status`` until it exits or
    ``timeout`` passes (exitcode None: still running; killed by a signal: 128 + signal)."""
    if not argv:
        raise ValueError("guest exec needs a command")
    deadline = clock() + timeout

    def budget() -> int:  # each agent call waits no longer than what is left (1-10 s)
        return int(max(1.0, min(10.0, deadline - clock())))

    started = command(dom, "guest-exec", budget(), {
        "path": argv[0], "arg": list(argv[1:]), "capture-output": bool(capture)})
    if not isinstance(started, dict) or "pid" not in started:
        raise HypervisorError(f"guest agent guest-exec: bad reply {started!r}")
    pid = int(started["pid"])
    while True:
        st = command(dom, "guest-exec-status", budget(), {"pid": pid})
        if isinstance(st, dict) and st.get("exited"):
            code = st.get("exitcode")
            if code is None:
                code = 128 + int(st.get("signal", 0))
            return GuestExecResult(pid, int(code), _text(st.get("out-data")),
                                   _text(st.get("err-data")))
        if clock() >= deadline:
            return GuestExecResult(pid, None)
        sleep(poll)
