"""``vmdr image backup`` / ``vmdr image restore``."""

from __future__ import annotations

import argparse

from vmdr.cli.common import Globals, out, repository
from vmdr.errors import UsageError
from vmdr.jobs.image import backup_image, restore_image
from vmdr.repository.resolve import check_name
from vmdr.ui.progress import human_bytes


def snapshot_name(text: str) -> str:
    """argparse type: a valid new snapshot name (README "Names")."""
    try:
        return check_name(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def cmd_backup(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "image backup") as r:
        res = backup_image(r, ns.path, ns.name, ns.tag, g.events, g.config.workers,
                           force_read=ns.force_read)
    g.result(res.as_dict())
    if not g.json:
        st = res.stats
        out(f"snapshot {res.snapshot.name}@{res.snapshot.short_id}: read "
            f"{human_bytes(st['bytes_read'])}, new {human_bytes(st['bytes_new'])}, stored "
            f"{human_bytes(st['bytes_stored'])} in {res.duration_s:.1f}s")
    return 0


def cmd_restore(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "image restore") as r:
        snap = r.resolve(ns.snapshot)
        res = restore_image(r, snap, ns.path, ns.format, ns.disk, ns.force, g.events)
    g.result(res)
    if not g.json:
        out(f"restored {snap.name}@{snap.short_id}:{res['disk']} to {ns.path} "
            f"({ns.format}, {human_bytes(res['size'])}) in {res['duration_s']:.1f}s")
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    img = sub.add_parser("image", help="back up and restore disk images outside libvirt",
                         description="Disk images of stopped VMs, LVM volumes, block devices.")
    s = img.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    p = s.add_parser("backup", parents=parents, help="back up a disk image or block device",
                     description="Read a raw/qcow2/... image or block device (allocated "
                                 "extents only) into a new snapshot.")
    p.add_argument("path", help="image file or block device")
    p.add_argument("--name", required=True, type=snapshot_name,
                   help="snapshot name (e.g. the VM or volume): up to 128 characters, no "
                        "'@', no control characters")
    p.add_argument("--tag", action="append", default=[], help="add a tag; repeatable")
    p.add_argument("--force-read", action="store_true",
                   help="read the image even if it looks unchanged since the last snapshot "
                        "(same device, inode, size, mtime and ctime)")
    p.set_defaults(func=cmd_backup)
    p = s.add_parser("restore", parents=parents, help="restore a disk to an image file",
                     description="Write a snapshot's disk as a sparse image.")
    p.add_argument("snapshot", help="NAME[@ID|@latest] or an ID prefix")
    p.add_argument("path", help="output image file or block device")
    p.add_argument("--format", choices=["raw", "qcow2", "vmdk"], default="raw",
                   help="output format (default raw)")
    p.add_argument("--disk", help="which disk of a multi-disk snapshot (e.g. vda)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_restore)
