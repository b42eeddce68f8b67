"""``vmdr backup`` and ``vmdr restore``: live VMs through libvirt."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys

from vmdr.cli.common import Globals, out, repository, warn
from vmdr.errors import DomainNotFound, UsageError
from vmdr.hypervisor import Hypervisor, connect
from vmdr.jobs.vmbackup import VMBackupOptions, VMBackupResult, backup_many, select_vms
from vmdr.jobs.vmrestore import RestoreOptions, restore_vm
from vmdr.repository.opening import open_repository
from vmdr.repository.resolve import check_name
from vmdr.storage.registry import redact
from vmdr.storage.throttle import bucket_for
from vmdr.ui.progress import human_bytes


def _uri(ns: argparse.Namespace, g: Globals) -> str:
    return str(getattr(ns, "connect", None) or os.environ.get("VMDR_CONNECT")
               or g.config.connect)


def _connect(uri: str) -> Hypervisor:
    return connect(uri)


def cmd_backup(ns: argparse.Namespace, g: Globals) -> int:
    if not ns.vms and not ns.all:
        raise UsageError("name one or more VMs (globs allowed) or use --all")
    cfg = g.config
    bucket = bucket_for(ns.bwlimit) if ns.bwlimit else None
    with _connect(_uri(ns, g)) as hv, open_repository(
            g.open_options(bandwidth=bucket), "shared", "backup") as repo:
        domains = hv.list_domains()
        names = select_vms(domains, ns.vms, ns.all, ns.with_tag,
                           {n: v.tags for n, v in cfg.vms.items()})
        unmatched = [p for p in ns.vms if any(c in p for c in "*?[")
                     and not any(fnmatch.fnmatchcase(n, p) for n in domains)]
        if not names:
            what = ", ".join(repr(p) for p in ns.vms) if ns.vms else "--all"
            tags = f" with tags {', '.join(ns.with_tag)}" if ns.with_tag else ""
            raise DomainNotFound(f"no VM on {redact(hv.uri)} matches {what}{tags}")
        for p in unmatched:
            warn(f"no VM matches {p!r}")

        def opts_for(name: str) -> VMBackupOptions:
            vm = cfg.vm(name)
            return VMBackupOptions(
                mode=ns.mode, consistency=ns.consistency or vm.consistency or cfg.consistency,
                method=ns.method, tags=list(ns.tag) + vm.tags, scratch_dir=cfg.scratch_dir,
                workers=cfg.workers, exclude_disks=vm.exclude_disks, hooks=cfg.hooks)

        # a VM whose name cannot name a snapshot fails before any disk is read
        refused = {}
        for n in names:
            try:
                check_name(n)
            except UsageError as exc:
                refused[n] = VMBackupResult(vm=n, error=exc.message, exit_code=exc.exit_code)
        done = backup_many(hv, repo, [n for n in names if n not in refused], opts_for,
                           cfg.concurrency, g.events)
        by_vm = {r.vm: r for r in done}
        results = [refused.get(n) or by_vm[n] for n in names]
    failed = [r for r in results if r.status != "ok"]
    g.result({"results": [r.as_dict() for r in results],
              "ok": len(results) - len(failed), "failed": len(failed)})
    if failed and len(failed) < len(results):
        g.outcome = "partial"
    if not g.json:
        out(f"{'VM':<20} {'STATUS':<7} {'SNAPSHOT':<9} {'MODE':<12} {'CONSISTENCY':<11} "
            f"{'READ':>10} {'STORED':>10} {'TIME':>7}")
        for r in results:
            out(f"{r.vm:<20} {r.status:<7} {(r.snapshot or '-')[:8]:<9} {r.mode or '-':<12} "
                f"{r.consistency or '-':<11} {human_bytes(r.bytes_read):>10} "
                f"{human_bytes(r.bytes_stored):>10} {r.duration_s:>6.1f}s")
            for w in r.warnings:
                out(f"  warning: {w}")
            if r.error:
                out(f"  error: {r.error}")
        if failed and len(failed) < len(results):
            out(f"partial success: {len(results) - len(failed)} of {len(results)} VMs backed up")
    for r in failed:  # the table is on stdout; scripts and cron mail read stderr
        sys.stderr.write(f"vmdr: error: {r.vm}: {r.error or 'backup failed'}\n")
    if not failed:
        return 0
    if len(results) == 1:
        return failed[0].exit_code or 1
    return 1


def cmd_restore(ns: argparse.Namespace, g: Globals) -> int:
    hv = _connect(_uri(ns, g)) if ns.define else None
    try:
        with repository(g, "shared", "restore") as repo:
            snap = repo.resolve(ns.snapshot)
            opts = RestoreOptions(
                target_dir=ns.target_dir, name=ns.name, format=ns.format, define=ns.define,
                start=ns.start, force=ns.force, disks=ns.disk or [],
                heartbeat=ns.heartbeat or g.config.vm(snap.name).heartbeat,
                timeout=ns.timeout,
            )
            res = restore_vm(repo, snap, opts, hv, g.events)
    finally:
        if hv is not None:
            hv.close()
    g.result(res)
    if g.json:
        return 0
    out(f"restored {snap.name}@{snap.short_id} as {res['vm']} into {res['target_dir']} "
        f"({human_bytes(res['bytes_written'])} written, {res['restore_s']:.1f}s)")
    for disk, path in res["disks"].items():
        out(f"  {disk}: {path}")
    if res["xml"]:
        out(f"  domain XML: {res['xml']}")
    if res["defined"]:
        out(f"  defined on {redact(_uri(ns, g))}")
    if res["started"]:
        out(f"  booted: heartbeat after {res['heartbeat_s']:.1f}s")
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "backup", parents=parents, help="back up running or stopped VMs (disks + config)",
        description="Back up VMs through libvirt while they run: pull-mode backup with "
                    "checkpoints (incrementals read only dirty blocks), quiesced through the "
                    "guest agent when it answers, crash-consistent otherwise.")
    p.add_argument("vms", nargs="*", metavar="VM", help="VM names or globs (e.g. 'web*')")
    p.add_argument("--all", action="store_true", help="every VM on the host")
    p.add_argument("--with-tag", action="append", metavar="TAG",
                   help="only VMs with this tag in the config ([vm.NAME] tags)")
    p.add_argument("--mode", choices=["auto", "full", "incremental"], default="auto",
                   help="auto: incremental when a valid checkpoint exists (default)")
    p.add_argument("--consistency", choices=["auto", "quiesce", "crash"],
                   help="auto: fsfreeze via the guest agent when it answers (default from "
                        "config, else auto)")
    p.add_argument("--method", choices=["auto", "checkpoint", "overlay", "offline"],
                   default="auto", help="capture method (default auto)")
    p.add_argument("--tag", action="append", default=[], help="tag the snapshots; repeatable")
    p.add_argument("--bwlimit", metavar="RATE",
                   help="limit bytes/s written to a remote (SFTP, S3) repository, e.g. 10M, "
                        "or windows by the local time: 'mon..fri 08:00..18:00 20M; * 100M'")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt URI (env VMDR_CONNECT, default qemu:///system)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore", parents=parents, help="restore a VM: disks, config, define, boot",
        description="Restore a VM snapshot's disks (sparse) and configuration into "
                    "--target-dir; optionally define it on a libvirt host and boot it.")
    p.add_argument("snapshot", help="VM[@ID|@latest]")
    p.add_argument("--target-dir", required=True, help="where the disk images go")
    p.add_argument("--name", help="restore under a new name (new UUID and MAC addresses)")
    p.add_argument("--format", choices=["qcow2", "raw", "vmdk"], default="qcow2",
                   help="disk format (default qcow2; vmdk for ESX)")
    p.add_argument("--disk", action="append", metavar="TARGET",
                   help="restore only this disk (e.g. vda); repeatable")
    p.add_argument("--define", action="store_true", help="register the VM with libvirt")
    p.add_argument("--start", action="store_true", help="boot it and wait for the heartbeat")
    p.add_argument("--heartbeat", metavar="agent|REGEX",
                   help="guest-agent ping (default) or a console regex")
    p.add_argument("--timeout", type=float, default=300.0, help="heartbeat timeout (s)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing files / replace a stopped domain of that name")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="libvirt URI to define on (env VMDR_CONNECT)")
    p.set_defaults(func=cmd_restore)
