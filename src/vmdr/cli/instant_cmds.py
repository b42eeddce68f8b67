"""``vmdr instant-restore``: boot a VM from the repository now, move its disks home meanwhile."""

from __future__ import annotations

import argparse
import os

from vmdr.cli.common import Globals, out, repository
from vmdr.errors import UsageError
from vmdr.hypervisor import connect
from vmdr.jobs.instant import DEFAULT_DIR, InstantOptions, instant_restore, instant_resume

DESCRIPTION = """\
Boot a VM at once from a snapshot: the repository serves the disks over NBD, the new
domain runs on local qcow2 overlays backed by them (its writes stay local), and libvirt
block copy moves every disk in full to DIR while the VM runs, then pivots onto the copies.
At the end it is an ordinary VM on local disks that no longer needs the repository.

The NBD server lives in this process: the command runs in the foreground until the disks
are moved. Ctrl-C (or an unreachable repository) leaves the VM paused with its data safe
in the overlays; 'vmdr instant-restore --resume NAME --target-dir DIR' continues."""


def _uri(ns: argparse.Namespace, g: Globals) -> str:
    return str(ns.connect or os.environ.get("VMDR_CONNECT") or g.config.connect)


def cmd_instant(ns: argparse.Namespace, g: Globals) -> int:
    if ns.resume and (ns.name or "@" in ns.vm):
        raise UsageError("--resume takes the name of the restored VM, without --name")
    if not ns.resume and not ns.name:
        raise UsageError("give the new VM a --name (instant recovery never replaces a VM)")
    name = ns.vm if ns.resume else ns.name
    opts = InstantOptions(
        name=name, target_dir=ns.target_dir,
        heartbeat=ns.heartbeat or g.config.vm(ns.vm.split("@")[0]).heartbeat,
        timeout=ns.timeout,
        bandwidth=int(ns.bandwidth * (1 << 20)) if ns.bandwidth else None,
        keep_overlays=ns.keep_overlays)
    with connect(_uri(ns, g)) as hv, repository(g, "shared", "instant-restore") as repo:
        if ns.resume:
            res = instant_resume(repo, name, opts, hv, g.events)
        else:
            res = instant_restore(repo, repo.resolve(ns.vm), opts, hv, g.events)
    g.result(res)
    if g.json:
        return 0
    hb = res.get("heartbeat_s")
    out(f"{res['vm']} runs on local disks ({res['duration_s']:.1f}s"
        + (f", heartbeat after {hb:.1f}s" if hb else "") + ")")
    for disk, path in res["disks"].items():
        out(f"  {disk}: {path}")
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("instant-restore", parents=parents,
                       help="boot a VM straight from the repository, then move its disks",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vm", metavar="VM[@SNAPSHOT]",
                   help="snapshot to boot (with --resume: the restored VM's name)")
    p.add_argument("--name", help="name of the new VM (new UUID and MAC addresses)")
    p.add_argument("--target-dir", default=DEFAULT_DIR,
                   help=f"where overlays and final disks go (default {DEFAULT_DIR}); "
                        "QEMU must be able to reach it")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted instant restore of VM")
    p.add_argument("--heartbeat", metavar="agent|REGEX",
                   help="guest-agent ping (default) or a console regex")
    p.add_argument("--timeout", type=float, default=300.0, help="heartbeat timeout (s)")
    p.add_argument("--bandwidth", type=float, metavar="MIB/S",
                   help="limit each disk copy (MiB/s); default unlimited")
    p.add_argument("--keep-overlays", action="store_true",
                   help="keep the overlay files after the move (for inspection)")
    p.add_argument("-c", "--connect", metavar="URI",
                   help="local libvirt URI (env VMDR_CONNECT, default qemu:///system)")
    p.set_defaults(func=cmd_instant)
