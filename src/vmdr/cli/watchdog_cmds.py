"""``vmdr watchdog run | check``: application and VM watchdogs of one host, in the
foreground (the agent hosts the same :class:`~vmdr.ha.monitor.Monitor`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import replace

from vmdr.cli.common import Globals, emit_json, out
from vmdr.errors import UsageError
from vmdr.ha import wdsettings
from vmdr.ha.escalate import Escalator
from vmdr.ha.model import load_policy
from vmdr.ha.monitor import Monitor, WatchdogEvent
from vmdr.ha.watchdog import decide, note
from vmdr.ha.wdsettings import WatchdogSettings
from vmdr.hypervisor import Hypervisor, connect
from vmdr.plan import inventory

EPILOG = """\
settings: [vm.NAME.watchdog] and [plan.tiers.NAME.watchdog] (checks in
[[vm.NAME.watchdog.checks]]), defaults from [ha]; see docs/operations.md "Watchdogs".

events (one line each, or JSON lines with --json): detected, reset, restarted, resumed,
app-restarted, escalated, gave-up, action-failed. Once a VM's restart budget is spent,
on_budget_exhausted = "failover" restarts it on another [hosts] host by the placement
rules (run knows this host by --host or its uri; the move is recorded as HA events in
etcd when [agent] etcd is set); with no other host that fits, or "alert", an alert.

exit codes: run: 130 when stopped (Ctrl-C, SIGTERM); check: 0 healthy, 1 a problem found;
2 bad configuration or arguments; 11 no such domain; 12 libvirt unreachable."""


def _uri(ns: argparse.Namespace, g: Globals) -> str:
    return str(getattr(ns, "connect", None) or os.environ.get("VMDR_CONNECT")
               or g.config.connect)


def _settings(ns: argparse.Namespace, g: Globals, names: list[str]) -> list[WatchdogSettings]:
    inv = inventory.from_config(g.config)
    every = wdsettings.parse_all(g.config, inv)
    if names:
        chosen = [replace(every.get(n) or wdsettings.for_vm(g.config, inv, n), enabled=True)
                  for n in dict.fromkeys(names)]
    else:
        chosen = [s for s in every.values() if s.enabled]
        if not chosen:
            raise UsageError("no VM has a watchdog: name VMs on the command line or add "
                             "[vm.NAME.watchdog] to the config")
    if ns.evidence_dir:
        chosen = [replace(s, evidence_dir=ns.evidence_dir) for s in chosen]
    return chosen


def cmd_run(ns: argparse.Namespace, g: Globals) -> int:
    settings = _settings(ns, g, ns.vms)
    uri = _uri(ns, g)

    def sink(ev: WatchdogEvent) -> None:
        line = json.dumps(ev.to_dict()) if g.json else ev.line()
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def opener() -> Hypervisor:
        return connect(uri)

    mon = Monitor(opener, settings, sink=sink, escalate=_escalator(ns, g, uri))
    if not g.json:
        out(f"watching {', '.join(s.vm for s in settings)} on {uri} (Ctrl-C stops)")
    mon.run(threading.Event(), max_cycles=ns.cycles)
    return 0


def _escalator(ns: argparse.Namespace, g: Globals, uri: str) -> Escalator | None:
    """The HA layer for ``on_budget_exhausted = "failover"``: restart on another inventory
    host (this one is ``--host``, or the inventory host whose uri is ``uri``)."""
    inv = inventory.from_config(g.config)
    host = ns.host or next((h.name for h in inv.hosts.values() if h.uri == uri), None)
    if host is None:
        return None
    if host not in inv.hosts:
        raise UsageError(f"--host: unknown host {host!r} (known: "
                         f"{', '.join(sorted(inv.hosts)) or 'none declared in [hosts]'})")
    from vmdr.cli.ha_ops_cmds import host_connector, open_records
    try:
        records = open_records(g.config)
    except UsageError:
        records = None
    return Escalator(inv, load_policy(inv), host_connector(inv), host, records)


def cmd_check(ns: argparse.Namespace, g: Globals) -> int:
    (s,) = _settings(ns, g, [ns.vm])
    with connect(_uri(ns, g)) as hv:
        hv.lookup(s.vm)  # DomainNotFound (exit 11) before anything else
        mon = Monitor(lambda: hv, [s])
        w = mon.vms[s.vm]
        obs, _dom = mon.observe(hv, w, force=True)
    note(w.track, obs)
    d = decide(s, w.track, obs)
    problems: list[str] = []
    if d.problem not in (None, "stopped", "paused"):
        problems.append(d.reason)
    if obs.state == "running" and s.heartbeat and obs.heartbeat is False:
        problems.append("guest agent does not answer")
    problems += [f"{r.name}: {r.detail}" for r in obs.checks if r.ok is False]
    if g.json:
        emit_json({
            "vm": s.vm, "state": obs.state, "reason": obs.reason,
            "agent": obs.heartbeat,
            "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail} for r in obs.checks],
            "decision": {"action": d.action, "problem": d.problem, "reason": d.reason},
            "problems": problems, "ok": not problems,
            "settings": {"interval_s": s.interval_s, "hang_timeout_s": s.hang_timeout_s,
                         "action": s.action, "restart_budget": s.restart_budget,
                         "restart_window_s": s.restart_window_s,
                         "on_budget_exhausted": s.on_budget_exhausted}})
    else:
        out(f"{s.vm}: {obs.state}" + (f" ({obs.reason})" if obs.reason else ""))
        if obs.heartbeat is not None:
            out(f"  guest agent: {'answers' if obs.heartbeat else 'does not answer'}")
        for r in obs.checks:
            verdict = {True: "ok", False: "FAILED", None: "unknown"}[r.ok]
            out(f"  check {r.name}: {verdict}: {r.detail}")
        if d.action != "none":
            out(f"  the watchdog would: {d.action} ({d.reason})")
        out("  healthy" if not problems else "  problems: " + "; ".join(problems))
    return 0 if not problems else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "watchdog", parents=parents, help="restart crashed or hung VMs and failed services",
        description="Application and VM watchdogs of one host: libvirt lifecycle events, a "
                    "guest-agent heartbeat and application checks through the guest agent; "
                    "a hung guest is reset with a console screenshot saved first.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    wsub = p.add_subparsers(dest="watchdog_command", metavar="SUBCOMMAND", required=True)

    r = wsub.add_parser(
        "run", parents=parents, help="watch VMs in the foreground until stopped",
        description="Watch VMs until Ctrl-C: every decision is printed with its reason. "
                    "Without VM names, every VM with a watchdog table in the config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("vms", nargs="*", metavar="VM", help="VMs to watch (default: configured)")
    r.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt URI (env VMDR_CONNECT, default qemu:///system)")
    r.add_argument("--evidence-dir", metavar="DIR",
                   help="where screenshots and console logs go (default from the config, "
                        "else /var/lib/vmdr/watchdog)")
    r.add_argument("--host", metavar="NAME",
                   help="this host's name in [hosts] (default: the host whose uri is the "
                        "connect URI); with it, a VM whose restart budget is spent is "
                        "restarted on another host (on_budget_exhausted = \"failover\")")
    r.add_argument("--cycles", type=int, metavar="N", help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_run)

    c = wsub.add_parser(
        "check", parents=parents, help="check one VM once and report (no action taken)",
        description="One pass of the watchdog over VM: state, guest-agent answer, every "
                    "application check, and what the watchdog would do. Takes no action.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("vm", metavar="VM")
    c.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt URI (env VMDR_CONNECT, default qemu:///system)")
    c.add_argument("--evidence-dir", metavar="DIR", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_check)
