"""Pieces of a backup session: what it reads (:class:`DiskSource`), what it is asked
(:class:`BackupOptions`) and the pull-mode ``<domainbackup>`` XML."""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from vmdr.errors import CheckpointMissing, HypervisorError

from .domain import DiskInfo
from .errors import is_code
from .nbd import Extent, FileReader, Reader, image_export

Method = Literal["auto", "checkpoint", "overlay", "offline"]
SOCKET_NAME = "nbd.sock"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the trailing NUL


@dataclass
class DiskSource:
    """One disk being read by a backup session."""

    info: DiskInfo
    incremental: bool
    reader: Reader
    full_reason: str | None = None  # why a requested incremental became a full

    @property
    def size(self) -> int:
        """Virtual size in bytes as the reader sees it."""
        return self.reader.size

    def extents(self) -> Iterator[Extent]:
        """(offset, length, is_data): allocation extents (full) or dirty extents (incremental)."""
        return self.reader.extents()

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset``; thread-safe."""
        return self.reader.read(offset, length)


@dataclass
class BackupOptions:
    """What the jobs layer asks for."""

    checkpoint_prefix: str
    scratch_dir: str
    disks: Sequence[str] | None = None
    incremental_from: str | None = None
    quiesce: bool = False
    method: Method = "auto"
    agent_timeout: int = 3
    freeze_timeout: int = 60
    qemu_user: str | None = None
    now: datetime | None = None


def image_reader(d: DiskInfo, *, lock: bool = False, bitmap: str | None = None) -> Reader:
    """Raw images are read directly (``lock``: as QEMU would lock them); others via qemu-nbd,
    which takes QEMU's own locks (``bitmap``: only what that qcow2 bitmap marks)."""
    assert d.source is not None
    if (d.format or "raw") == "raw":
        return FileReader(d.source, label=d.target, lock=lock)
    return image_export(d.source, d.format or "raw", label=d.target, bitmap=bitmap)


def pull_backup_xml(all_disks: Sequence[DiskInfo], selected: Sequence[DiskInfo],
                    decisions: dict[str, str | None], incremental_from: str | None,
                    socket_path: str, workdir: str) -> str:
    """``<domainbackup mode='pull'>`` with a per-disk full/incremental mode."""
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=socket_path)
    disks = ET.SubElement(root, "disks")
    chosen = {d.target for d in selected}
    for d in all_disks:
        if d.target not in chosen:
            if d.device == "disk" and d.source is not None:
                ET.SubElement(disks, "disk", name=d.target, backup="no")
            continue
        el = ET.SubElement(disks, "disk", name=d.target, backup="yes", type="file")
        if decisions.get(d.target) is None and incremental_from is not None:
            el.set("backupmode", "incremental")
            el.set("incremental", incremental_from)
        else:
            el.set("backupmode", "full")
        ET.SubElement(el, "scratch", file=posixpath.join(workdir, f"{d.target}.scratch"))
    return ET.tostring(root, encoding="unicode")


def inconsistent(exc: HypervisorError) -> bool:
    """libvirt rejected an incremental: checkpoint or bitmap missing."""
    return isinstance(exc, CheckpointMissing)


def unsupported(exc: HypervisorError) -> bool:
    """libvirt or QEMU lacks pull-mode backup."""
    cause = exc.__cause__
    return cause is not None and is_code(cause, "VIR_ERR_NO_SUPPORT",
                                         "VIR_ERR_OPERATION_UNSUPPORTED")
