"""What a failover does with one recovered VM: wait until it is ready, move its
addresses (re-IP) through the guest agent, run the plan's scripts, take its screenshot.

Readiness (per priority group, ``ready =``):

* ``agent``: the guest agent answers (the guest booted its userland; VMware Tools'
  heartbeat in SRM);
* ``tcp:PORT``: the port accepts a connection at one of the guest's addresses, tried *on
  the DR host* (the guest's network is reachable there, never from vmdr's host);
* ``exec:COMMAND``: a command on vmdr's host exits 0 (``$VMDR_VM``, ``$VMDR_ADDRESSES``);
* ``guest:COMMAND``: ``/bin/sh -c COMMAND`` in the guest exits 0 (through the agent);
* ``none``: running is enough.

Re-IP: the host maps each guest address through the plan's rules
(:meth:`vmdr.plan.recovery.ReIPRule.map`) and runs a small POSIX sh helper in the guest
(``busybox``: ``ip`` only, for the running system; ``debian``: also rewrites
``/etc/network/interfaces``; ``auto``: by ``/etc/os-release``; ``script:PATH``: the
user's own script, sent through the agent, called with ``OLD/NN NEW/NN GATEWAY DNS...``
once per moved address).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmdr.errors import HookFailed, HypervisorError, UsageError, VmdrError
from vmdr.hypervisor import Domain
from vmdr.plan.recovery import ReIPRule

REIP_SH = r"""old=$1 new=$2 gw=$3 helper=$4; shift 4
ip=$(command -v ip) || { echo "no ip command in the guest" >&2; exit 3; }
dev=$($ip -o -4 addr show | awk -v a="$old" '$4 == a {print $2; exit}')
[ -n "$dev" ] || { echo "no interface holds $old" >&2; exit 4; }
$ip addr add "$new" dev "$dev" && $ip addr del "$old" dev "$dev" || exit 5
[ -n "$gw" ] && $ip route replace default via "$gw" dev "$dev"
if [ "$helper" = auto ]; then
  helper=busybox
  grep -qsE '^ID(_LIKE)?=.*debian' /etc/os-release && helper=debian
fi
if [ "$helper" = debian ] && [ -f /etc/network/interfaces ]; then
  o=${old%/*} n=${new%/*}
  sed -i "s#\b$o\b#$n#g" /etc/network/interfaces /etc/network/interfaces.d/* 2>/dev/null
  [ -n "$gw" ] && sed -i "s#^\(\s*gateway\s\).*#\1$gw#" /etc/network/interfaces
fi
if [ "$#" -gt 0 ]; then
  { for d in "$@"; do echo "nameserver $d"; done; } > /etc/resolv.conf.vmdr &&
    mv -f /etc/resolv.conf.vmdr /etc/resolv.conf
fi
exit 0
"""


@dataclass
class Ready:
    how: str
    seconds: float


def wait_ready(dom: Domain, ready: str, timeout: float, run_on_dr: Callable[..., int],
               env: dict[str, str], clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> Ready:
    """Wait until ``dom`` meets ``ready`` (HeartbeatTimeout-like FailoverFailed message as
    HypervisorError when ``timeout`` passes or the domain stops)."""
    t0 = clock()
    kind, _, arg = ready.partition(":")
    last = ""
    while True:
        if not dom.is_active():
            raise HypervisorError(f"{dom.name} stopped before it was ready ({ready})")
        try:
            if kind == "none":
                ok = True
            elif kind == "agent":
                ok = dom.guest_ping(timeout=3)
            elif kind == "guest":
                r = dom.guest_exec(["/bin/sh", "-c", arg], timeout=30)
                ok, last = r.ok, (r.stderr or r.stdout).strip()[-200:]
            elif kind == "tcp":
                addrs = dom.guest_addresses()
                codes = [run_on_dr(a, int(arg)) for a in addrs]
                ok = 0 in codes
                last = f"no address answers on port {arg}" if addrs else "no address known yet"
                if codes and set(codes) == {127}:
                    last = "the DR host has neither bash nor nc to try the port"
            else:  # exec
                e = {**os.environ, **env, "VMDR_ADDRESSES": " ".join(_addrs(dom))}
                p = subprocess.run(["/bin/sh", "-c", arg], env=e, capture_output=True,
                                   text=True, timeout=60, check=False,
                                   stdin=subprocess.DEVNULL)
                ok, last = p.returncode == 0, (p.stderr or p.stdout).strip()[-200:]
        except VmdrError as exc:
            ok, last = False, exc.message
        except subprocess.TimeoutExpired:
            ok, last = False, "the command timed out"
        if ok:
            return Ready(ready, clock() - t0)
        if clock() - t0 > timeout:
            why = f": {last}" if last else ""
            raise HypervisorError(f"{dom.name} not ready ({ready}) within {timeout:.0f}s{why}")
        sleep(1.0)


def _addrs(dom: Domain) -> list[str]:
    try:
        return dom.guest_addresses()
    except VmdrError:
        return []


def reip(dom: Domain, rules: tuple[ReIPRule, ...], helper: str, test: bool) -> list[str]:
    """Move every guest address a rule matches; the addresses after (HookFailed when the
    guest refuses a move). No rules: nothing to do, the addresses as they are."""
    addrs = _addrs(dom)
    if not rules:
        return addrs
    script = REIP_SH
    if helper.startswith("script:"):
        path = helper[len("script:"):]
        try:
            with open(path, encoding="utf-8") as f:
                script = f.read()
        except OSError as exc:
            raise UsageError(f"re-IP script {path}: {exc.strerror}") from None
    out = []
    for a in addrs:
        rule = next((r for r in rules if r.map(a, test) is not None), None)
        if rule is None:
            out.append(a)
            continue
        prefix = rule.source.prefixlen
        new = rule.map(a, test) or ""
        gw = "" if test else (rule.gateway or "")
        args = [f"{a}/{prefix}", new, gw, helper if not helper.startswith("script:")
                else "script", *rule.dns]
        r = dom.guest_exec(["/bin/sh", "-c", script, "vmdr-reip", *args], timeout=60)
        if not r.ok:
            raise HookFailed(f"{dom.name}: re-IP {a} → {new} failed in the guest: "
                             f"{(r.stderr or r.stdout).strip()[-200:] or r.exitcode}")
        out.append(new.split("/", 1)[0])
    return out


def run_script(spec: str, doms: list[Domain], env: dict[str, str],
               timeout: float = 600) -> str:
    """``host:CMD`` (on vmdr's host, once) or ``guest:CMD`` (in each domain); a one-line
    summary. HookFailed when it exits non-zero."""
    where, _, cmd = spec.partition(":")
    if where == "host":
        try:
            p = subprocess.run(["/bin/sh", "-c", cmd], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=timeout, check=False,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise HookFailed(f"script {shlex.quote(cmd)} timed out after {timeout:.0f}s") \
                from None
        if p.returncode != 0:
            raise HookFailed(f"script {shlex.quote(cmd)} exited {p.returncode}: "
                             f"{(p.stderr or p.stdout).strip()[-200:]}")
        return "host: exit 0"
    for d in doms:
        r = d.guest_exec(["/bin/sh", "-c", cmd], timeout=timeout)
        if not r.ok:
            raise HookFailed(f"{d.name}: guest script {shlex.quote(cmd)} exited "
                             f"{r.exitcode}: {(r.stderr or r.stdout).strip()[-200:]}")
    return f"guest: exit 0 in {len(doms)} VM(s)"
