"""Application checks run inside a guest through its agent (``guest-exec``).

* ``tcp = PORT``: a socket listens on the port inside the guest (``/proc/net/tcp`` and
  ``tcp6`` read through the agent, so no network path from the host to the guest is
  needed, and a test network is never touched from the host);
* ``process = "NAME"``: a process whose name (``/proc/PID/comm``, 15 characters) is NAME;
* ``command = "..."``: a shell command (``/bin/sh -c``) that exits 0.

A check that cannot run because the agent does not answer is *unknown* (``ok=None``), not
failed: the agent's silence is the VM-level watchdog's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmdr.errors import HypervisorError

from .ports import DomainPort, ExecResultPort
from .wdsettings import AppCheck

__all__ = ["CheckResult", "listening", "process_running", "restart_app", "run_check"]

SHELL = "/bin/sh"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool | None  # None: could not be run (agent unavailable)
    detail: str


def listening(proc_net_tcp: str, port: int) -> bool:
    """A socket in LISTEN state on ``port`` in the text of ``/proc/net/tcp[6]``."""
    for line in proc_net_tcp.splitlines():
        f = line.split()
        if len(f) < 4 or ":" not in f[1]:
            continue
        try:
            local_port = int(f[1].rsplit(":", 1)[1], 16)
        except ValueError:
            continue  # the header line
        if local_port == port and f[3].upper() == TCP_LISTEN:
            return True
    return False


def process_running(comms: str, name: str) -> bool:
    """``name`` among the process names (one per line, as in ``/proc/*/comm``)."""
    want = name[:15]
    return any(line.strip() == want for line in comms.splitlines())


def _sh(dom: DomainPort, script: str, timeout: float, *, capture: bool = True) -> ExecResultPort:
    return dom.guest_exec([SHELL, "-c", script], timeout=timeout, capture=capture)


def run_check(dom: DomainPort, check: AppCheck) -> CheckResult:
    """Run one check in the guest."""
    try:
        if check.kind == "tcp":
            r = _sh(dom, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", check.timeout_s)
            ok = listening(r.stdout, int(check.target))
            return CheckResult(check.name, ok, f"{check.describe()} "
                               f"{'listening' if ok else 'not listening'} in the guest")
        if check.kind == "process":
            r = _sh(dom, "cat /proc/[0-9]*/comm 2>/dev/null", check.timeout_s)
            ok = process_running(r.stdout, check.target)
            return CheckResult(check.name, ok, f"{check.describe()} "
                               f"{'running' if ok else 'not running'} in the guest")
        r = _sh(dom, check.target, check.timeout_s)
    except HypervisorError as exc:
        return CheckResult(check.name, None, f"{check.describe()} not checked: {exc.message}")
    if r.exitcode is None:
        return CheckResult(check.name, False, f"{check.describe()} did not finish within "
                                              f"{check.timeout_s:g}s")
    out = (r.stderr or r.stdout).strip().splitlines()
    tail = f": {out[-1][:200]}" if out and not r.ok else ""
    return CheckResult(check.name, r.ok, f"{check.describe()} exited {r.exitcode}{tail}")


def restart_app(dom: DomainPort, check: AppCheck) -> tuple[bool, str]:
    """Run the check's restart command in the guest: (worked, what happened). A command
    still running at the timeout counts as started (a service in the foreground)."""
    if not check.restart:
        return False, "no restart command"
    try:
        # no output captured: qemu-ga reports a command as exited only once its output
        # pipes close, and a daemon it starts would hold them open
        r = _sh(dom, check.restart, check.timeout_s, capture=False)
    except HypervisorError as exc:
        return False, f"restart command not run: {exc.message}"
    if r.exitcode is None:
        return True, f"restart command still running after {check.timeout_s:g}s (foreground)"
    if r.ok:
        return True, "restart command exited 0"
    return False, f"restart command exited {r.exitcode}"
