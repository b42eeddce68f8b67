"""``vmdr replicate`` (standby replicas at a DR site) and ``vmdr replicate status``."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from vmdr.cli.common import Globals, emit_json, out, repository, warn
from vmdr.errors import HypervisorUnavailable, UsageError, VmdrError
from vmdr.hypervisor import Hypervisor, connect
from vmdr.jobs.mirror_state import MODES
from vmdr.jobs.replica_status import DEFAULT_ROOT, Where, collect, resolve_host
from vmdr.jobs.replicate import (
    FEEDS,
    CycleResult,
    ReplicaSpec,
    redact_uri,
    replicate_direct,
)
from vmdr.jobs.replicate_repo import replicate_from_repository
from vmdr.jobs.replicate_site import Site
from vmdr.jobs.replicate_state import STATE_FILE, parse_network_map
from vmdr.plan import inventory as invmod
from vmdr.plan.units import parse_duration
from vmdr.repository.repo import Repository
from vmdr.storage.throttle import Windows, bucket_for


def _source_uri(ns: argparse.Namespace, g: Globals) -> str:
    return str(getattr(ns, "connect", None) or os.environ.get("VMDR_CONNECT")
               or g.config.connect)


def _resolve_host(g: Globals, to: str, root: str | None) -> Where:
    return resolve_host(g.config, to, root)


def _specs(ns: argparse.Namespace, g: Globals, vms: list[str]) -> list[ReplicaSpec]:
    decls = invmod.replica_decls(g.config)
    if ns.all:
        vms = sorted(set(vms) | set(decls))
    if not vms:
        raise UsageError("name a VM to replicate (or --all for the inventory's replicas)")
    try:
        cli_map = parse_network_map(ns.network_map or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    rpo = parse_duration(ns.rpo) if ns.rpo else None
    bwlimit = getattr(ns, "bwlimit", None)
    bucket = bucket_for(bwlimit) if bwlimit else None  # one budget for the whole run
    plan_rpo: dict[str, float | None] = {}
    out_: list[ReplicaSpec] = []
    for vm in vms:
        d = decls.get(vm)
        to = ns.to or (d.to if d else None)
        if not to:
            raise UsageError(f"{vm}: no DR host: use --to HOST (a libvirt URI or an "
                             "inventory host) or set [replicas] to / replica_to")
        where = _resolve_host(g, to, ns.dir or (d.directory if d else None))
        if vm in g.config.vms and not plan_rpo:
            try:
                inv = invmod.from_config(g.config)
                plan_rpo = {n: inv.rpo_target(v) for n, v in inv.vms.items()}
            except VmdrError:
                plan_rpo = {}
        out_.append(ReplicaSpec(
            vm=vm, target_uri=where.uri, directory=f"{where.root}/{vm}",
            standby=ns.standby_name or (d.standby if d and d.standby else ""),
            keep=ns.points or (d.points if d else 3),
            feed=ns.feed or (d.feed if d else "direct"),
            rpo_target_s=rpo if rpo is not None else (d.rpo_s if d and d.rpo_s is not None
                                                      else plan_rpo.get(vm)),
            network_map={**(dict(d.network_map) if d else {}), **cli_map},
            consistency=ns.consistency, scratch_dir=g.config.scratch_dir,
            compress=getattr(ns, "compress", True), bandwidth=bucket))
    if ns.standby_name and len(out_) > 1:
        raise UsageError("--standby-name names one standby: replicate one VM at a time")
    return out_


def _open_target(spec: ReplicaSpec) -> tuple[Hypervisor, Site]:
    """libvirt's connection to the DR host and the Site's ssh control master. The master
    is this user's persistent one for the DR host (:mod:`vmdr.hypervisor.ssh_mux`): when
    an earlier cycle left it up, both go over it and nobody logs in; else they log in at
    the same time, and as soon as the master is up (libvirt's RPC handshake takes longer)
    the direct feed's first command at the DR host (its state) runs, so a cycle's fixed
    cost is at most one login. A reused master that fails that first command (its link
    died) is replaced once. A private master (``VMDR_SSH_PERSIST=0``) starts in this
    thread: its parent-death signal would fire when another ended; libvirt logs in from a
    helper thread."""
    site = Site(spec.target_uri, compress=spec.compress, shared=True).start()
    lv_uri = site.libvirt_uri()
    got: dict[str, Any] = {}

    def libvirt_login() -> None:
        try:
            local = site.libvirt_forward()
            if local is not None:  # over a forward of the DR host's libvirt socket
                try:
                    got["target"] = t = connect(f"qemu+unix:///system?socket={local}")
                    t.uri, t.local = spec.target_uri, False  # it is the DR host's libvirt
                    got["forwarded"] = True
                    return
                except VmdrError:
                    site.forget_libvirt_socket()
            got["target"] = connect(lv_uri)
        except BaseException as exc:  # handed to the cycle's thread below
            got["error"] = exc

    th = threading.Thread(target=libvirt_login, name="vmdr-dr-libvirt", daemon=True)
    th.start()
    failed: BaseException | None = None
    replaced = False
    try:
        site.open()
        site.ready_next()  # the session of serve (or commit) starts now, in the background
        if spec.feed == "direct":
            try:
                site.prefetch(spec.directory, [STATE_FILE])
            except HypervisorUnavailable:
                if not site.reused:
                    raise
                site.replace_master()  # an old master whose link is gone: log in again
                replaced = True
                site.prefetch(spec.directory, [STATE_FILE])
    except BaseException as exc:
        failed = exc
    th.join()
    if replaced and failed is None and got.get("forwarded"):
        got.pop("target").close()  # it went over the old master: connect again
        try:
            got["target"] = connect(site.libvirt_uri())
        except BaseException as exc:
            got["error"] = exc
    err = got.get("error")
    if err is not None:
        site.close()
        if isinstance(err, HypervisorUnavailable):
            shown = redact_uri(spec.target_uri)
            msg = err.message.replace(lv_uri, shown).replace(spec.target_uri, shown)
            why = " ".join(msg.split())  # one line
            raise HypervisorUnavailable(f"DR host {shown} unreachable: {why}") from None
        raise err
    target: Hypervisor = got["target"]
    if failed is not None:
        site.close()
        target.close()
        raise failed
    return target, site


def _one(ns: argparse.Namespace, g: Globals, spec: ReplicaSpec) -> CycleResult:
    t0 = time.monotonic()
    target, site_ = _open_target(spec)
    opened = time.monotonic() - t0
    try:
        with site_ as site:
            if spec.feed == "repository":
                with repository(g, "shared", "replicate") as repo:
                    res = replicate_from_repository(repo, target, site, spec, ns.snapshot)
            else:
                hv = connect(_source_uri(ns, g))
                with contextlib.ExitStack() as stack:
                    def seed_repo() -> Repository:
                        return stack.enter_context(repository(g, "shared", "replicate"))

                    try:
                        res = replicate_direct(hv, target, site, spec,
                                               seed_repo if g.repo else None)
                    finally:
                        hv.close()
    finally:
        target.close()
    res.timings = {"connect": opened, **res.timings}  # the two ssh logins, overlapped
    return res


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_replicate(ns: argparse.Namespace, g: Globals) -> int:
    vms = list(ns.vms or [])
    if vms[:1] == ["status"]:
        return cmd_status(ns, g, vms[1:])
    if vms[:1] == ["stop"]:
        return cmd_stop(ns, g, vms[1:])
    if vms[:1] == ["release"]:
        return cmd_release(ns, g, vms[1:])
    specs = _specs(ns, g, vms)
    modes = {s.vm: _mode(ns, g, s.vm) for s in specs}
    mirrors = [s for s in specs if modes[s.vm] in ("mirror", "sync")]
    if len(specs) == 1 and mirrors:
        return cmd_continuous(ns, g, specs[0], modes[specs[0].vm])
    if mirrors:
        # each mirror in a process of its own (its own connections, signals, and pid for
        # 'vmdr replicate stop VM'); this one runs the snapshot cycles meanwhile
        for s in mirrors:
            _continuous_options(ns, s, modes[s.vm])  # bad input: before anything starts
        kids = [_fork_mirror(ns, g, s, modes[s.vm]) for s in mirrors]
        old = _forward_signals(kids, chain=True)  # a stop here stops them too
        try:
            code, results = _cycles(ns, g, [s for s in specs if s not in mirrors])
        finally:
            _restore(old)
            done = _wait_mirrors(kids)
        for r in done:
            code = code or int(r.get("exit_code") or 0)
        if g.json:
            emit_json({"results": [*results, *done]})
        return code
    code, results = _cycles(ns, g, specs)
    if g.json:
        emit_json({"results": results})
    return code


def _cycles(ns: argparse.Namespace, g: Globals,
            specs: list[ReplicaSpec]) -> tuple[int, list[dict[str, Any]]]:
    """One snapshot cycle per spec, in turn: the exit code (the first failure's) and
    the results. With one spec a failure raises."""
    results: list[dict[str, Any]] = []
    code = 0
    for spec in specs:
        try:
            r = _one(ns, g, spec)
        except VmdrError as exc:
            if len(specs) == 1:
                raise
            code = code or exc.exit_code
            results.append({"vm": spec.vm, "status": "failed", "error": exc.message,
                            "exit_code": exc.exit_code})
            warn(f"{spec.vm}: {exc.message}")
            continue
        results.append({"status": "ok", **r.as_dict()})
        if not g.json:
            for w in r.warnings:
                warn(f"{r.vm}: {w}")
            out(f"{r.vm} → {r.standby} on {r.target} ({r.feed}): {r.mode}, "
                f"{_mib(r.bytes_moved)} moved of {_mib(r.disk_bytes)}, point {r.point} "
                f"({len(r.points)} kept) in {r.duration_s:.1f}s")
    return code, results


# -- status -----------------------------------------------------------------------------------


def cmd_status(ns: argparse.Namespace, g: Globals, vms: list[str]) -> int:
    rows = collect(g.config, vms, ns.to, ns.dir)
    if g.json:
        emit_json({"replicas": rows})
        return 0
    if not rows:
        out("no replicas")
        return 0
    out(f"{'VM':<20} {'mode':<8} {'SLA':<20} {'RPO now':>9} {'target':>8} "
        f"{'newest point':<22} {'points':>6} {'last moved':>11}")
    for r in rows:
        age = "-" if r["rpo_achieved_s"] is None else _dur(r["rpo_achieved_s"])
        tgt = "-" if r.get("rpo_target_s") is None else _dur(r["rpo_target_s"])
        last = r.get("last_cycle") or {}
        moved = _mib(last["bytes_moved"]) if last else "-"
        out(f"{r['vm']:<20} {r['mode']:<8} {r['sla_label']:<20} {age:>9} {tgt:>8} "
            f"{(r.get('newest_point') or '-'):<22} {len(r.get('points') or []):>6} "
            f"{moved:>11}" + (f"  ({r['error']})" if r.get("error") else "")
            + (f"  last cycle failed: {last['error']}" if last.get("error") else "")
            + (f"  mirror {r['mirror']['state']}" + (f" ({r['mirror']['error']})"
               if r['mirror'].get('error') and r['mirror']['state'] != 'mirroring' else "")
               if r.get("mirror") else "")
            + (f"  {r['in_use']}" if r.get("in_use") else ""))
    return 0


def cmd_release(ns: argparse.Namespace, g: Globals, vms: list[str]) -> int:
    """``vmdr replicate release VM``: the HA copy's overlays and marker removed (the VM is
    home); refused while anything at the DR host still uses them."""
    from vmdr.jobs.replica_guard import release

    if len(vms) != 1:
        raise UsageError("usage: vmdr replicate release VM [--to HOST] [--dir DIR]")
    vm = vms[0]
    d = invmod.replica_decls(g.config).get(vm)
    if not ns.to and d is None:
        raise UsageError(f"{vm}: not a replica of the inventory; add --to HOST")
    where = _resolve_host(g, ns.to or (d.to if d else ""), ns.dir or (d.directory if d
                                                                       else None))
    directory = f"{where.root}/{vm}"
    target = connect(where.uri)
    try:
        with Site(where.uri) as site:
            doc = release(site, target, directory, vm)
    finally:
        target.close()
    if g.json:
        emit_json(doc)
    else:
        out(f"{vm}: released the replica in {directory} on {redact_uri(where.uri)} "
            f"({len(doc['removed'])} overlay(s) removed); replica cycles resume")
    return 0


# -- continuous mirror -------------------------------------------------------------------------


def _mode(ns: argparse.Namespace, g: Globals, vm: str) -> str:
    if ns.sync:
        return "sync"
    if ns.continuous:
        return "mirror"
    if ns.mode:
        return str(ns.mode)
    d = invmod.replica_decls(g.config).get(vm)
    return d.mode if d else "snapshot"


def _seconds(text: str | None, default: float) -> float:
    if not text:
        return default
    v = parse_duration(text)
    if v is None:
        raise UsageError(f"bad duration {text!r} (e.g. 30s, 5m, 1h)")
    return v


def _continuous_options(ns: argparse.Namespace, spec: ReplicaSpec, mode: str) -> Any:
    from vmdr.jobs.mirror import MirrorOptions  # not on a cycle's path

    if spec.feed != "direct":
        raise UsageError(f"{spec.vm}: a continuous mirror reads the running VM: --feed direct")
    return MirrorOptions(
        synchronous=mode == "sync",
        point_interval_s=_seconds(ns.point_interval, 300.0),
        stall_s=_seconds(ns.stall, 15.0),
        retry_s=_seconds(ns.retry, 30.0),
        run_for_s=_seconds(ns.run_for, 0.0) or None, exit_on_abort=ns.exit_on_abort,
        bandwidth=Windows.parse(ns.bwlimit) if getattr(ns, "bwlimit", None) else None)


def _run_continuous(ns: argparse.Namespace, g: Globals, spec: ReplicaSpec,
                    mode: str) -> dict[str, Any]:
    """One supervised mirror in the foreground until a signal or ``--for``."""
    from vmdr.jobs.mirror import Supervisor

    opts = _continuous_options(ns, spec, mode)
    if opts.bandwidth is not None and opts.synchronous:
        warn(f"{spec.vm}: with --sync, --bwlimit caps only the copy until the DR copy is in "
             "step (and its catch-up after a fall-back); each guest write still goes to the "
             "DR site at once, uncapped (capping it would slow the guest)")
    stop = threading.Event()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where is it? (diagnostics)
    old = {sig: signal.signal(sig, lambda *_a: stop.set())
           for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        res = Supervisor(spec, opts, _source_uri(ns, g), g.events, stop).run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return {"status": "ok", "stopped_by": "signal" if stop.is_set() else "time",
            **res.as_dict()}


def _said(doc: dict[str, Any]) -> str:
    return (f"{doc['vm']} → {doc['target']} ({doc['mode']} mirror): {doc['starts']} "
            f"start(s), {doc['aborts']} abort(s), {doc['cycles']} snapshot cycle(s), "
            f"{len(doc['points'])} restore point(s) in {doc['duration_s']:.0f}s; stopped "
            f"({doc['stopped_by']})")


def cmd_continuous(ns: argparse.Namespace, g: Globals, spec: ReplicaSpec, mode: str) -> int:
    doc = _run_continuous(ns, g, spec, mode)
    if g.json:
        emit_json({"results": [doc]})
    else:
        out(_said(doc))
    return 0


@dataclass
class _Kid:
    vm: str
    pid: int
    got: list[bytes]
    reader: threading.Thread


def _fork_mirror(ns: argparse.Namespace, g: Globals, spec: ReplicaSpec, mode: str) -> _Kid:
    """Run one VM's mirror in a child process; its result comes back as JSON on a pipe.
    Forked before this process opened any connection, so the child shares none."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        code = 70
        try:
            os.close(r)
            try:
                doc = _run_continuous(ns, g, spec, mode)
                code = 0
            except VmdrError as exc:  # the parent warns
                doc = {"vm": spec.vm, "status": "failed", "error": exc.message,
                       "exit_code": exc.exit_code}
                code = exc.exit_code
            except Exception as exc:  # reported by the parent (exit 70)
                doc = {"vm": spec.vm, "status": "failed", "exit_code": code,
                       "error": f"internal error: {type(exc).__name__}: {exc}"}
            if not g.json and code == 0:
                out(_said(doc))
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(doc, default=str).encode())
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    got: list[bytes] = []

    def read() -> None:
        with os.fdopen(r, "rb") as f:
            got.append(f.read())

    th = threading.Thread(target=read, name=f"vmdr-mirror-{spec.vm}", daemon=True)
    th.start()
    return _Kid(spec.vm, pid, got, th)


_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _forward_signals(kids: list[_Kid], *, chain: bool) -> dict[int, Any]:
    """SIGTERM, SIGINT and SIGHUP here stop every mirror child (SIGTERM to each), then,
    with *chain*, do here what they did before. The handlers replaced."""
    old: dict[int, Any] = {}

    def forward(sig: int, frame: Any) -> None:
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k.pid, signal.SIGTERM)
        prev = old.get(sig)
        if chain and callable(prev):
            prev(sig, frame)

    for sig in _STOPS:
        old[sig] = signal.signal(sig, forward)
    return old


def _restore(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)


def _wait_mirrors(kids: list[_Kid]) -> list[dict[str, Any]]:
    """Wait for every mirror child (SIGTERM, SIGINT, SIGHUP here reach them all); their
    results, one per VM."""
    old = _forward_signals(kids, chain=False)
    docs: list[dict[str, Any]] = []
    try:
        for k in kids:
            _pid, status = os.waitpid(k.pid, 0)
            k.reader.join()
            code = os.waitstatus_to_exitcode(status)
            try:
                doc = json.loads(b"".join(k.got).decode() or "null")
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                doc = {"vm": k.vm, "status": "failed", "exit_code": code or 70,
                       "error": f"the mirror process ended ({code}) without a result"}
            if doc.get("status") != "ok":
                warn(f"{k.vm}: {doc.get('error')}")
            docs.append(doc)
    finally:
        _restore(old)
    return docs


def cmd_stop(ns: argparse.Namespace, g: Globals, vms: list[str]) -> int:
    if len(vms) != 1:
        raise UsageError("usage: vmdr replicate stop VM (one VM whose mirror runs here)")
    from vmdr.jobs.mirror import abort_leftover, stop_supervisor

    vm = vms[0]
    try:
        doc = stop_supervisor(vm)
    except UsageError:
        # no supervisor here: abort what a killed one left (the VM keeps its own disks)
        hv = connect(_source_uri(ns, g))
        try:
            left = abort_leftover(hv, vm)
        finally:
            hv.close()
        if not left:
            raise
        doc = {"vm": vm, "stopped": True, "aborted_leftover": left}
    if g.json:
        emit_json(doc)
    else:
        out(f"{vm}: continuous replication stopped; the VM runs on its own disks")
    return 0


def _dur(s: float) -> str:
    s = float(s)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replicate", parents=parents,
        help="keep a standby copy of a VM at a DR site (vmdr replicate status: their state)",
        description="Run one replica cycle per VM: read what changed since the last cycle "
                    "(direct: the VM's dirty bitmaps, its own checkpoint chain; repository: "
                    "the newest snapshot at the DR site), write only that into the standby's "
                    "disks at the DR host, keep N restore points (qcow2 internal snapshots) "
                    "and a defined, stopped standby domain (new UUID, DR networks). "
                    "'vmdr replicate status [--to HOST] [VM...]' shows each replica's newest "
                    "point, achieved RPO against its target and SLA state, read from the "
                    "state kept at the target. --continuous [--sync] keeps a live mirror "
                    "instead (libvirt block copy to an NBD export at the DR host through an "
                    "ssh tunnel), falling back to snapshot cycles when the DR site is gone; "
                    "'vmdr replicate stop VM' ends it. A replica that an HA copy (or a "
                    "failover) runs on is never written: 'vmdr replicate release VM' frees "
                    "it once the VM is home (removes the HA copy's overlays; refused while "
                    "a domain at the DR host uses them).",
        epilog="exit codes: 9 no space at the target, 10 a DR network is missing, 11 no such "
               "VM, 12 the DR host is unreachable, 13 another job holds the VM's lock, or "
               "an HA copy or a failover runs on the replica",
    )
    p.add_argument("vms", nargs="*", metavar="VM",
                   help="VMs to replicate; 'status' as the first word shows the replicas, "
                        "'release VM' frees a replica an HA copy ran on")
    p.add_argument("--to", metavar="HOST",
                   help="DR host: a libvirt URI (qemu+ssh://root@dr1/system, qemu:///system) "
                        "or an inventory host name")
    p.add_argument("--all", action="store_true",
                   help="every replica of the inventory, each in its mode: mirrors run "
                        "side by side, each in a process of its own ('vmdr replicate stop "
                        "VM' stops one; a signal to this process stops them all), while "
                        "the snapshot cycles run here one after the other")
    p.add_argument("--points", type=int, metavar="N", help="restore points kept (default 3)")
    p.add_argument("--dir", metavar="DIR",
                   help=f"replica root at the DR host; the standby of VM is in DIR/VM "
                        f"(default {DEFAULT_ROOT}, or <host target_dir>/vmdr-replicas)")
    p.add_argument("--standby-name", metavar="NAME",
                   help="the standby domain's name (default VM-replica)")
    p.add_argument("--feed", choices=FEEDS,
                   help="direct (host to host over ssh) or repository (newest snapshot of "
                        "--repo, at the DR site)")
    p.add_argument("--snapshot", metavar="REF", help="repository feed: this snapshot, not "
                   "the newest")
    p.add_argument("--network-map", action="append", metavar="SRC=DR",
                   help="map the VM's source network to a DR network (repeatable)")
    p.add_argument("--rpo", metavar="DURATION", help="RPO target, e.g. 15m (default: the "
                   "inventory's)")
    p.add_argument("--no-compress", dest="compress", action="store_false",
                   help="send the changed pieces raw, without vmdr's zstd (a fast LAN "
                        "link to the DR site; a piece zstd cannot shrink is sent raw "
                        "anyway). ssh itself never compresses")
    p.add_argument("--bwlimit", metavar="RATE",
                   help="limit the bytes/s sent to the DR host, e.g. 10M, or windows by the "
                        "local time: 'mon..fri 08:00..18:00 20M; * 100M' (as backup and "
                        "copy). Snapshot cycles: the changed pieces, before compression. "
                        "Mirror: libvirt's block-job bandwidth, split over the disks and "
                        "changed as the windows change; with --sync it caps only the copy "
                        "until in step, never a guest write")
    p.add_argument("--consistency", choices=("auto", "crash"), default="auto",
                   help="auto: freeze the guest's filesystems if its agent answers")
    p.add_argument("--mode", choices=MODES,
                   help="snapshot: one cycle (default, or the inventory's replica mode); "
                        "mirror: --continuous; sync: --sync")
    p.add_argument("--continuous", action="store_true",
                   help="keep a live mirror of the running VM's disks at the DR host "
                        "(background copy, RPO of seconds); runs until stopped")
    p.add_argument("--sync", action="store_true",
                   help="with --continuous: synchronous writes (RPO 0; each guest write "
                        "waits for the DR site)")
    p.add_argument("--point-interval", metavar="DURATION",
                   help="mirror: a restore point this often (default 5m)")
    p.add_argument("--stall", metavar="DURATION",
                   help="mirror: abort when the copy makes no progress this long (15s)")
    p.add_argument("--retry", metavar="DURATION",
                   help="mirror: first wait before starting it again after an abort (30s, "
                        "doubling per abort in a row)")
    p.add_argument("--for", dest="run_for", metavar="DURATION",
                   help="mirror: stop after this long (default: until 'vmdr replicate stop')")
    p.add_argument("--exit-on-abort", action="store_true",
                   help="mirror: exit (code 12) when the mirror is aborted instead of falling "
                        "back to snapshot cycles here (the agent alerts and restarts it)")
    p.add_argument("-c", "--connect", metavar="URI", help="the source's libvirt URI")
    p.set_defaults(func=cmd_replicate)
