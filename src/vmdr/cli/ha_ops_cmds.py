"""``vmdr ha maintenance | test``: the operator's side of HA (registered by ha_cmds)."""

from __future__ import annotations

import argparse
import os

from vmdr.cli.common import Globals, emit_json, out, warn
from vmdr.config import Config
from vmdr.errors import HypervisorError, HypervisorUnavailable, UsageError
from vmdr.ha import hatest, maintenance
from vmdr.ha.fleet import Connect, OpsHost
from vmdr.ha.model import load_policy
from vmdr.ha.records import HARecords
from vmdr.ha.store import HAStore
from vmdr.ha.wdsettings import DEFAULT_EVIDENCE_DIR
from vmdr.hypervisor import connect
from vmdr.hypervisor.overlay import create_file
from vmdr.plan import inventory

MAINTENANCE_EPILOG = """\
The host is marked in etcd (ha/maintenance/HOST, [agent] etcd): from then on it is never a
failover or placement target. Each VM running there is live-migrated (peer to peer:
the host's libvirtd connects to the target's hosts.NAME.migration_uri, default its uri)
to the host the placement rules choose: capacity, anti-affinity, host affinity. Nothing
moves, and the mark is not set, when a VM has nowhere to go.

exit codes: 0 done (or --exit of a host not in maintenance); 2 unknown host, no etcd
configured, bad inventory; 10 a migration failed (the host stays in maintenance; the VMs
moved so far stay moved); 12 the host's libvirt is unreachable; 44 refused, nothing
moved: the last host up, or a VM has nowhere to go."""

TEST_EPILOG = """\
A throw-away copy boots on the host the VM would fail over to, from qcow2 overlays next
to its disks on the shared storage (the disks are held still meanwhile by a temporary
overlay that takes production's writes, merged back afterwards: production keeps
running). The copy has no network interface. It passes when its guest agent answers;
a screenshot is saved; the copy and its overlays are removed. A pass is recorded in etcd
(ha/tests/VM) and counts for the DR plan's host-level HA coverage.

Crash safety: before the freeze, DISKDIR/VM.hatest.vmdr-state.json (0600, next to the
VM's first disk) records the test. If vmdr is killed mid-test, production keeps running
on DISKDIR/VM-DISK.hatest.vmdr-overlay.qcow2; the next `vmdr ha test VM` first undoes
that (merges the overlay back: blockcommit + pivot; destroys the copy), and
`vmdr ha test VM --recover` does only that. A test still running elsewhere is not
touched (exit 13).

exit codes: 0 passed; 44 nowhere to fail over to; 2 unknown VM, not under HA or not
running; 10 the copy did not answer (failed) or libvirt failed; 12 a host unreachable;
13 a failover test of VM is still running (its state file names the pid and host)."""


def open_records(cfg: Config, *, required: str | None = None) -> HARecords | None:
    """The fleet's HA records in etcd, or None when no etcd is configured (UsageError
    naming ``required`` if it is needed)."""
    if not cfg.agent.etcd:
        if required:
            raise UsageError(f"{required} needs the fleet's etcd: set [agent] etcd = "
                             "[\"http://HOST:2379\", ...] in the config")
        return None
    from vmdr.agent.coord_etcd import EtcdCoordinator
    coord = EtcdCoordinator(cfg.agent.etcd, 10.0, cfg.agent.etcd_prefix)
    return HARecords(HAStore.for_coordinator(coord, me=os.uname().nodename))


def host_connector(inv: inventory.Inventory) -> Connect:
    def conn(host: str) -> OpsHost:
        uri = inv.hosts[host].uri if host in inv.hosts else None
        if not uri:
            raise HypervisorUnavailable(f"hosts.{host}: no uri configured")
        return connect(uri)
    return conn


def cmd_maintenance(ns: argparse.Namespace, g: Globals) -> int:
    inv = inventory.from_config(g.config)
    policy = load_policy(inv)
    records = open_records(g.config, required="vmdr ha maintenance")
    assert records is not None
    if ns.exit:
        ended = maintenance.leave(inv, records, ns.host)
        if g.json:
            emit_json({"host": ns.host, "maintenance": False, "was_in_maintenance": ended})
        else:
            out(f"{ns.host}: maintenance ended" if ended
                else f"{ns.host}: was not in maintenance")
        return 0
    ev = maintenance.enter(inv, policy, records, host_connector(inv), ns.host,
                           reason=ns.reason or "", unsafe=ns.unsafe)
    if g.json:
        emit_json({**ev.to_json(), "maintenance": True})
        return 0
    out(f"{ns.host}: in maintenance" + (" (already)" if ev.already else ""))
    for m in ev.moves:
        out(f"  {m.vm} → {m.target}  ({m.seconds or 0:.1f}s)")
    if not ev.moves:
        out("  no VM was running there")
    for n in ev.notes:
        out(f"  note: {n}")
    return 0


def cmd_test(ns: argparse.Namespace, g: Globals) -> int:
    if not ns.timeout > 0:  # also nan
        raise UsageError(f"--timeout: expected seconds above 0, got {ns.timeout:g}")
    inv = inventory.from_config(g.config)
    policy = load_policy(inv)
    records = open_records(g.config)
    if ns.recover:
        done = hatest.recover_vm(inv, records, host_connector(inv), ns.vm)
        if g.json:
            emit_json({"vm": ns.vm, "recovered": done})
        else:
            out(f"{ns.vm}: " + ("undid an interrupted failover test:" if done
                                else "nothing left by an interrupted failover test"))
            for d in done:
                out(f"  {d}")
        return 0
    res = hatest.run_test(inv, policy, records, host_connector(inv), ns.vm,
                          make_overlay=create_file,
                          evidence_dir=ns.evidence_dir or DEFAULT_EVIDENCE_DIR,
                          timeout=ns.timeout)
    if records is None:
        warn("no [agent] etcd configured: the result is not recorded, so it does not count "
             "for the DR plan")
    if g.json:
        emit_json(res.to_json())
        return 0 if res.ok else HypervisorError.exit_code
    for d in res.recovered:
        out(f"{res.vm}: undid an interrupted failover test: {d}")
    if res.ok:
        out(f"{res.vm}: failover test passed: a copy booted on {res.target} (isolated, no "
            f"network) in {res.start_s or 0:.1f}s and its guest agent answered after "
            f"{res.ready_s or 0:.1f}s; {res.source} kept running it")
        for e in res.evidence:
            out(f"  evidence: {e}")
    else:
        out(f"{res.vm}: failover test FAILED on {res.target}: {res.error}")
    if not res.ok:
        raise HypervisorError(f"failover test of {res.vm} failed on {res.target}: "
                              f"{res.error}")
    return 0


def register(psub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    q = psub.add_parser(
        "maintenance", parents=parents, help="live-migrate a host's VMs away, keep it out "
                                             "of placement (--exit ends it)",
        description="Put HOST in maintenance: live-migrate every VM running there to the "
                    "other hosts by the placement rules, and keep HOST out of every "
                    "failover and placement until --exit.",
        epilog=MAINTENANCE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("host", metavar="HOST", help="an inventory host ([hosts.NAME])")
    q.add_argument("--exit", action="store_true", help="end the maintenance of HOST")
    q.add_argument("--reason", metavar="TEXT", help="why (kept in etcd and the event)")
    q.add_argument("--unsafe", action="store_true",
                   help="allow migrating disks without cache='none' (a plain shared "
                        "directory rather than a cluster filesystem or SAN)")
    q.set_defaults(func=cmd_maintenance)
    q = psub.add_parser(
        "test", parents=parents, help="non-disruptive failover test of one HA VM",
        description="Boot an isolated throw-away copy of VM on the host it would fail over "
                    "to, wait for its guest agent, screenshot it, remove it, and record the "
                    "pass in etcd.",
        epilog=TEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("vm", metavar="VM")
    q.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds the copy gets to answer (default 300)")
    q.add_argument("--evidence-dir", metavar="DIR",
                   help=f"where the screenshot goes (default {DEFAULT_EVIDENCE_DIR})")
    q.add_argument("--recover", action="store_true",
                   help="only undo what an interrupted test of VM left (production back on "
                        "its own images, the copy destroyed); exit 0 also when nothing was "
                        "left")
    q.set_defaults(func=cmd_test)
