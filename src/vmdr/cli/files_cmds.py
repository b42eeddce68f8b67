"""File-level restore: ``vmdr files ls|get|partitions``, ``vmdr mount`` and ``vmdr umount``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime

from vmdr.cli.common import Globals, emit_json, out, repository
from vmdr.jobs import mount as job
from vmdr.repository.repo import Repository
from vmdr.ui.progress import human_bytes

HOW = ("The disk is served from the repository over NBD, exposed as a read-only file with "
       "nbdfuse and the partition mounted read-only through a loop device, without journal "
       "replay (ext2/3/4, xfs, btrfs; MBR, GPT or no partition table). Needs root.")


def cmd_ls(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "files ls") as repo:
        res = job.files_ls(repo, repo.resolve(ns.snapshot), ns.disk, ns.partition, ns.path)
    if g.json:
        emit_json(res)
        return 0
    for e in res["entries"]:
        when = datetime.fromtimestamp(e["mtime"], UTC).strftime("%Y-%m-%d %H:%M")
        name = e["name"] + ("/" if e["type"] == "dir" else "")
        if "target" in e:
            name += f" -> {e['target']}"
        out(f"{e['mode']} {e['size']:>12} {when} {name}")
    return 0


def cmd_get(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "files get") as repo:
        res = job.files_get(repo, repo.resolve(ns.snapshot), ns.disk, ns.partition, ns.path,
                            ns.dest)
    if g.json:
        emit_json(res)
    else:
        out(f"copied {ns.path} to {res['dest']} ({res['files']} files, "
            f"{human_bytes(res['bytes'])}, {res['duration_s']:.1f}s)")
    return 0


def cmd_partitions(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "files partitions") as repo:
        res = job.list_partitions(repo, repo.resolve(ns.snapshot), ns.disk)
    if g.json:
        emit_json(res)
        return 0
    out(f"{'PART':>4} {'START':>12} {'SIZE':>10} {'TYPE':<38} {'FS':<8} LABEL")
    for p in res["partitions"]:
        out(f"{p['number']:>4} {p['start']:>12} {human_bytes(p['size']):>10} "
            f"{p['type'] or '-':<38} {p['fstype'] or '-':<8} {p['label'] or ''}")
    return 0


def _opener(g: Globals) -> Callable[[], Repository]:
    """Open the repository again in the mount holder (which takes its own lock); the
    passphrase is asked once here (``g.passphrase`` remembers it)."""
    return lambda: repository(g, None)


def cmd_mount(ns: argparse.Namespace, g: Globals) -> int:
    open_repo = _opener(g)
    with open_repo() as repo:
        snap = repo.resolve(ns.snapshot)
        job.pick_disk(snap, ns.disk)
    res = job.mount_background(open_repo, snap.id, ns.disk, ns.partition, ns.mountpoint)
    if g.json:
        emit_json(res)
    else:
        out(f"mounted {res['name']}@{res['snapshot'][:8]} {res['disk']} "
            f"partition {res['partition']} ({res['fstype']}, read-only) at "
            f"{res['mountpoint']}; 'vmdr umount {res['mountpoint']}' when done")
    return 0


def cmd_umount(ns: argparse.Namespace, g: Globals) -> int:
    res = job.umount(ns.mountpoint)
    if g.json:
        emit_json(res)
    else:
        out(f"unmounted {res['mountpoint']}")
    return 0


def _target_args(p: argparse.ArgumentParser, disk_example: str) -> None:
    p.add_argument("snapshot", metavar="VM[@SNAPSHOT]", help="snapshot (default: latest)")
    p.add_argument("--disk", metavar="TARGET",
                   help=f"which disk, e.g. {disk_example} (default: the first)")
    p.add_argument("--partition", type=int, metavar="N",
                   help="partition number (default: the only one with a readable filesystem)")


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    files = sub.add_parser("files", help="list and copy single files out of a snapshot",
                           description="File-level restore. " + HOW)
    s = files.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    p = s.add_parser("ls", parents=parents, help="list a directory of a snapshot's disk",
                     description="List PATH (a directory or file) inside a snapshot. " + HOW)
    _target_args(p, "vdb")
    p.add_argument("path", help="path inside the filesystem (/ for its root)")
    p.set_defaults(func=cmd_ls)
    p = s.add_parser("get", parents=parents, help="copy a file or directory out",
                     description="Copy PATH (file, or directory tree with symlinks kept) "
                                 "out of a snapshot to DEST. " + HOW)
    _target_args(p, "vdb")
    p.add_argument("path", help="path inside the filesystem")
    p.add_argument("dest", nargs="?", default=".",
                   help="destination file or existing directory (default: .)")
    p.set_defaults(func=cmd_get)
    p = s.add_parser("partitions", parents=parents, help="show a disk's partitions",
                     description="Partitions of a snapshot's disk and their filesystems.")
    p.add_argument("snapshot", metavar="VM[@SNAPSHOT]", help="snapshot (default: latest)")
    p.add_argument("--disk", metavar="TARGET", help="which disk (default: the first)")
    p.set_defaults(func=cmd_partitions)

    p = sub.add_parser("mount", parents=parents,
                       help="mount a snapshot's partition read-only",
                       description="Mount one filesystem of a snapshot read-only at "
                                   "MOUNTPOINT until 'vmdr umount'. A background process "
                                   "serves the disk meanwhile. " + HOW)
    _target_args(p, "vda")
    p.add_argument("mountpoint", help="an existing directory")
    p.set_defaults(func=cmd_mount)
    p = sub.add_parser("umount", parents=parents, help="unmount what 'vmdr mount' mounted",
                       description="Unmount MOUNTPOINT and stop its background process.")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)
