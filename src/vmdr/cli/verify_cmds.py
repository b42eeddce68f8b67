"""``vmdr serve`` (a snapshot's disks over NBD) and ``vmdr verify`` (data, and boot)."""

from __future__ import annotations

import argparse
import os
import time

from vmdr.cli.common import Globals, emit_json, out, repository, warn
from vmdr.errors import UsageError, VerificationFailed
from vmdr.hypervisor import Hypervisor, connect
from vmdr.jobs.verify import (
    VerifyOptions,
    cleanup_sandboxes,
    options_for,
    select_snapshots,
    verify_snapshot,
)
from vmdr.serve import start_server


def _uri(ns: argparse.Namespace, g: Globals) -> str:
    return str(getattr(ns, "connect", None) or os.environ.get("VMDR_CONNECT")
               or g.config.connect)


def _check_listen(addr: str) -> None:
    import socket

    try:
        socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--listen {addr!r}: not an address this host can listen on "
                         f"({exc})") from None


def cmd_serve(ns: argparse.Namespace, g: Globals) -> int:
    if ns.port is not None:
        _check_listen(ns.listen)
    with repository(g, "shared", "serve") as repo:
        snap = repo.resolve(ns.snapshot)
        srv = start_server(repo, snap, disks=ns.disk or None, socket_dir=ns.socket_dir,
                           socket_path=ns.socket, port=ns.port, listen=ns.listen,
                           socket_owner=ns.socket_owner, detach=ns.detach)
        try:
            info = {"snapshot": snap.id, "name": snap.name, "exports": srv.exports,
                    "sockets": srv.sockets, "pids": srv.pids, "detached": ns.detach}
            if g.json:
                emit_json(info)
            else:
                out(f"serving {snap.name}@{snap.short_id} read-only over NBD"
                    + (" (detached)" if ns.detach else "; Ctrl-C stops"))
                for disk, uri in srv.exports.items():
                    out(f"  {disk}: {uri}")
            if ns.detach:
                if not g.json:
                    out(f"  stop with: kill {' '.join(str(p) for p in srv.pids.values())}")
                warn("detached servers hold no repository lock: do not prune meanwhile")
                return 0
            import sys

            sys.stdout.flush()
            while srv.alive():
                time.sleep(0.5)
            raise UsageError("an NBD server stopped unexpectedly")
        except KeyboardInterrupt:
            if not g.json:
                out("stopped")
            return 0
        finally:
            if not ns.detach:
                srv.stop()


def _connect_if(boot: bool, uri: str) -> Hypervisor | None:
    return connect(uri) if boot else None


def cmd_verify(ns: argparse.Namespace, g: Globals) -> int:
    cfg = g.config
    base = VerifyOptions(
        boot=ns.boot, timeout=ns.timeout if ns.timeout is not None else 300.0,
        agent=False if ns.no_agent else None, console=ns.console, ports=ns.port or [],
        scripts=[os.path.abspath(s) for s in ns.script or []], network=ns.network,
        evidence_dir=ns.evidence_dir, scratch_dir=cfg.scratch_dir, uri=_uri(ns, g),
        record=not ns.no_record)
    for s in base.scripts:
        if not os.access(s, os.X_OK):
            raise UsageError(f"{s}: not an executable script")
    results = []
    hv = _connect_if(ns.boot, base.uri)
    try:
        if not ns.boot:
            cleanup_sandboxes(base.scratch_dir, None)  # --boot does it with libvirt
        with repository(g, "shared", "verify") as repo:
            snaps = select_snapshots(repo, ns.snapshots, ns.all, ns.latest, ns.boot)
            if not snaps:
                raise UsageError("no snapshot to verify")
            for snap in snaps:
                opts = options_for(base, cfg.vm(snap.name), f"vm.{snap.name}.")
                res = verify_snapshot(repo, snap, opts, hv, g.events)
                results.append(res)
                if not g.json:
                    _print(res)
    finally:
        if hv is not None:
            hv.close()
    failed = [r for r in results if r.status != "passed"]
    if len(results) == 1 and not ns.all:
        g.result(results[0].as_dict())
    else:
        g.result({"status": "failed" if failed else "passed",
                  "passed": len(results) - len(failed), "failed": len(failed),
                  "results": [r.as_dict() for r in results]})
    if failed and len(failed) < len(results):
        g.outcome = "partial"
    if failed:
        names = ", ".join(f"{r.snapshot.name}@{r.snapshot.short_id} "
                          f"({', '.join(r.failed_checks())})" for r in failed[:3])
        raise VerificationFailed(f"{len(failed)} of {len(results)} snapshots failed "
                                 f"verification: {names}")
    return 0


def _print(res: object) -> None:
    from vmdr.jobs.verify import VerifyResult

    assert isinstance(res, VerifyResult)
    s = res.snapshot
    hb = f", heartbeat after {res.heartbeat_s:.1f}s" if res.heartbeat_s is not None else ""
    out(f"{s.name}@{s.short_id}: {res.status.upper()}{hb} ({res.duration_s:.1f}s)")
    for c in res.checks:
        secs = f"{c.seconds:6.1f}s" if c.seconds is not None else "      -"
        out(f"  {c.status:<7} {c.name:<18} {secs}  {c.detail}")
    for ev in res.evidence:
        att = ev.get("attachment")
        where = ev.get("path") or (f"attachment {att[:16]}" if att else "not kept")
        out(f"  evidence: {ev['type']} {ev['width']}x{ev['height']} → {where}")
    for w in res.warnings:
        out(f"  warning: {w}")


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve", parents=parents, help="serve a snapshot's disks read-only over NBD",
        description="Serve a snapshot's disks as read-only NBD exports straight from the "
                    "repository (nbdkit; chunks fetched on demand, holes reported as "
                    "holes). Runs until Ctrl-C unless --detach. One unix socket per disk "
                    "by default, or TCP ports N, N+1, … (no TLS: loopback by default).")
    p.add_argument("snapshot", help="VM[@ID|@latest] or an ID prefix")
    p.add_argument("--disk", action="append", metavar="TARGET",
                   help="serve only this disk (e.g. vda); repeatable")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="unix socket path (one disk)")
    where.add_argument("--socket-dir", metavar="DIR",
                       help="put <disk>.sock here (default: a private dir under /run/vmdr)")
    where.add_argument("--port", type=int, metavar="N", help="TCP port of the first disk")
    p.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                   help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument("--socket-owner", metavar="USER",
                   help="give the sockets to USER (e.g. libvirt-qemu for QEMU)")
    p.add_argument("--detach", action="store_true",
                   help="leave the servers running after vmdr exits (prints their pids)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "verify", parents=parents, help="verify snapshots: data, and optionally a test boot",
        description="Check a snapshot's chunks (fetch, authenticate, decompress, re-hash). "
                    "With --boot, boot it in an isolated sandbox without restoring: disks "
                    "served over NBD under a throw-away qcow2 overlay, a transient domain "
                    "with a new name/UUID and no network; heartbeats, ports and scripts "
                    "decide, and a screenshot is kept. The result is attached to the "
                    "snapshot. Config: [vm.NAME] verify_agent, verify_console, "
                    "verify_ports, verify_script, verify_network, verify_timeout.")
    p.add_argument("snapshots", nargs="*", metavar="SNAPSHOT", help="VM[@ID|@latest]")
    p.add_argument("--all", action="store_true", help="every snapshot (VM snapshots with --boot)")
    p.add_argument("--latest", action="store_true", help="with --all: the latest per name")
    p.add_argument("--boot", action="store_true", help="boot it in a sandbox")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds for the heartbeats and checks (default 300)")
    p.add_argument("--script", action="append", metavar="PATH",
                   help="test script run against the booted sandbox (exit 0 = pass); "
                        "gets VMDR_VERIFY_DOMAIN, VMDR_VERIFY_CONSOLE, VMDR_SNAPSHOT")
    p.add_argument("--console", metavar="REGEX", help="heartbeat: regex on the serial console")
    p.add_argument("--no-agent", action="store_true", help="do not wait for the guest agent")
    p.add_argument("--port", type=int, action="append", metavar="N",
                   help="TCP port that must answer (needs --network); repeatable")
    p.add_argument("--network", metavar="NET",
                   help="attach one NIC to this isolated libvirt network (no forwarding)")
    p.add_argument("--evidence-dir", metavar="DIR", help="also save the screenshot here")
    p.add_argument("--no-record", action="store_true",
                   help="do not attach the result to the snapshot")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt URI (env VMDR_CONNECT, default qemu:///system)")
    p.set_defaults(func=cmd_verify)
