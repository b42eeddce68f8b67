"""Read-only access to the filesystems inside a disk image, for file-level restore.

The disk is an NBD export (``vmdr.serve``). ``nbdfuse`` (Debian ``libnbd-bin``) turns it
into a read-only file in a private FUSE mount; ``sfdisk --json`` reads its MBR or GPT
partition table; ``blkid`` probes each partition for a filesystem; a read-only loop device
with ``--offset``/``--sizelimit`` exposes one partition, which is mounted read-only without
journal replay (ext3/ext4 ``noload``, xfs ``norecovery``, btrfs ``rescue=nologreplay``),
always ``nodev,nosuid,noexec``. The kernel NBD client is not used: many hosts (and
containers) lack the ``nbd`` module, while loop devices and FUSE are everywhere.

Modules: partitions (table + filesystem probing, mount options), diskfile (nbdfuse),
mounts (loop devices and mounts), guestpath (confined paths: never follow a guest's
symlinks out of its filesystem).
"""

from __future__ import annotations

from vmdr.errors import UnsupportedFilesystem

from .diskfile import DiskFile
from .guestpath import copy_out, list_path, resolve
from .mounts import Mounted, mount_partition
from .partitions import SUPPORTED, Partition, choose, read_partitions

__all__ = [
    "SUPPORTED",
    "DiskFile",
    "Mounted",
    "Partition",
    "UnsupportedFilesystem",
    "choose",
    "copy_out",
    "list_path",
    "mount_partition",
    "read_partitions",
    "resolve",
]
