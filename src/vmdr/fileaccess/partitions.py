"""Partition tables (MBR, GPT, or none) and filesystem probing of a disk image file."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from vmdr.errors import UnsupportedFilesystem, UsageError, VmdrError

# filesystem type -> mount options that never write to the image (no journal replay)
SUPPORTED: dict[str, str] = {
    "ext4": "ro,noload",
    "ext3": "ro,noload",
    "ext2": "ro",
    "xfs": "ro,norecovery,nouuid",
    "btrfs": "ro,rescue=nologreplay",
    "vfat": "ro",
}
SAFE = "nodev,nosuid,noexec"


@dataclass(frozen=True)
class Partition:
    """``number`` 0 means the whole disk (no partition table)."""

    number: int
    start: int
    size: int
    type: str
    fstype: str | None = None
    label: str | None = None

    @property
    def supported(self) -> bool:
        return self.fstype in SUPPORTED

    def mount_options(self) -> str:
        if self.fstype not in SUPPORTED:
            raise UnsupportedFilesystem(self.unsupported_message())
        return f"{SUPPORTED[self.fstype]},{SAFE}"

    def describe(self) -> str:
        return "the whole disk" if self.number == 0 else f"partition {self.number}"

    def unsupported_message(self) -> str:
        found = f"holds {self.fstype}" if self.fstype else "has no filesystem"
        return (f"{self.describe()} {found}; vmdr can read "
                f"{', '.join(sorted(SUPPORTED))}")

    def as_dict(self) -> dict[str, object]:
        return {"number": self.number, "start": self.start, "size": self.size,
                "type": self.type, "fstype": self.fstype, "label": self.label}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise VmdrError(f"{argv[0]} is not installed (Debian: util-linux)") from None


def probe(path: str, offset: int, size: int) -> tuple[str | None, str | None]:
    """(filesystem type, label) at ``offset`` of ``path``, or (None, None)."""
    p = _run(["blkid", "-p", "-O", str(offset), "-S", str(size), "-o", "export", path])
    tags = dict(ln.split("=", 1) for ln in p.stdout.splitlines() if "=" in ln)
    return tags.get("TYPE"), tags.get("LABEL")


def parse_sfdisk(doc: dict[str, object]) -> tuple[int, list[tuple[int, int, int, str]]]:
    """(sector size, [(number, start sector, sectors, type)]) from ``sfdisk --json``."""
    table = doc.get("partitiontable")
    if not isinstance(table, dict):
        raise ValueError("no partitiontable")
    sector = int(table.get("sectorsize", 512))
    out = []
    for i, part in enumerate(table.get("partitions") or [], 1):
        node = str(part.get("node", ""))
        digits = node[len(node.rstrip("0123456789")):]
        number = int(digits) if digits else i
        out.append((number, int(part["start"]), int(part["size"]),
                    str(part.get("type", ""))))
    return sector, out


def read_partitions(path: str, disk_size: int) -> list[Partition]:
    """The partitions of an image with their filesystems; a disk without a partition table
    is one "partition" number 0 covering it all."""
    p = _run(["sfdisk", "--json", path])
    rows: list[tuple[int, int, int, str]] = []
    sector = 512
    if p.returncode == 0 and p.stdout.strip():
        try:
            sector, rows = parse_sfdisk(json.loads(p.stdout))
        except (ValueError, KeyError, TypeError):
            raise VmdrError(f"cannot read the partition table: {p.stdout[:200]!r}") from None
    out = []
    if not rows:
        fs, label = probe(path, 0, disk_size)
        return [Partition(0, 0, disk_size, "", fs, label)]
    for number, start, count, ptype in rows:
        if ptype in ("5", "f", "85"):  # MBR extended containers hold logical partitions
            continue
        off, size = start * sector, count * sector
        fs, label = probe(path, off, size)
        out.append(Partition(number, off, size, ptype, fs, label))
    return out


def choose(parts: list[Partition], number: int | None, disk: str) -> Partition:
    """The partition to open: ``number``, or the only one with a readable filesystem."""
    if number is not None:
        for part in parts:
            if part.number == number:
                if not part.supported:
                    raise UnsupportedFilesystem(f"disk {disk}: {part.unsupported_message()}")
                return part
        have = ", ".join(str(p.number) for p in parts) or "none"
        raise UsageError(f"disk {disk} has no partition {number} (it has: {have})")
    good = [p for p in parts if p.supported]
    if len(good) == 1:
        return good[0]
    if not good:
        found = ", ".join(f"{p.describe()}: {p.fstype or 'none'}" for p in parts)
        raise UnsupportedFilesystem(f"disk {disk} has no filesystem vmdr can read ({found}); "
                                    f"supported: {', '.join(sorted(SUPPORTED))}")
    nums = ", ".join(str(p.number) for p in good)
    raise UsageError(f"disk {disk} has several filesystems (partitions {nums}): "
                     "pick one with --partition")
