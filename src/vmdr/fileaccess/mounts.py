"""Mounting one partition of an image file read-only through a loop device."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from vmdr.errors import BusyMount, VmdrError

from .partitions import Partition


@dataclass(frozen=True)
class Mounted:
    mountpoint: str
    partition: Partition


def mount_partition(image: str, part: Partition, mountpoint: str) -> Mounted:
    """Mount ``part`` of ``image`` at ``mountpoint``: read-only loop device (``mount``
    sets it up with autoclear, so unmounting frees it), no journal replay."""
    opts = (f"{part.mount_options()},loop,offset={part.start},sizelimit={part.size}")
    p = subprocess.run(["mount", "-t", str(part.fstype), "-o", opts, image, mountpoint],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["mount failed"])[-1]
        raise VmdrError(f"cannot mount {part.describe()} ({part.fstype}): {err}")
    return Mounted(mountpoint, part)


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount ``mountpoint`` (no error if nothing is mounted there)."""
    if not os.path.ismount(mountpoint):
        return
    p = subprocess.run(["umount", *(["-l"] if lazy else []), mountpoint],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["umount failed"])[-1]
        if "busy" in err:
            raise BusyMount(f"{mountpoint} is busy (a process uses it); close it and retry")
        raise VmdrError(f"cannot unmount {mountpoint}: {err}")
