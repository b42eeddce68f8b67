"""Minimal deterministic writer for the cpio "newc" format used by Linux initramfs.

Written in Python (instead of calling cpio(1)) so entries get uid/gid 0, mtime 0 and device
nodes such as /dev/console can be created without root privileges or mknod.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    """One archive member; ``data`` is the file content or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, nlink: int) -> bytes:
    fields = (
        ino,
        e.mode,
        0,
        0,
        nlink,
        0,
        len(e.data),
        0,
        0,
        e.rdev[0],
        e.rdev[1],
        len(e.name.encode()) + 1,
        0,
    )
    return b"070701" + b"".join(f"{v:08x}".encode() for v in fields)


def write_newc(out: BinaryIO, entries: list[Entry]) -> None:
    """Write ``entries`` (parents before children) followed by the TRAILER!!! record."""
    trailer = Entry("TRAILER!!!", 0)
    for ino, e in enumerate([*entries, trailer], start=1):
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        head = _header(ino if e is not trailer else 0, e, nlink) + e.name.encode() + b"\0"
        out.write(head + _pad4(len(head)))
        out.write(e.data + _pad4(len(e.data)))


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def chardev(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))
