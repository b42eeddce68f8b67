"""Read disk images: NBD exports through libnbd, and plain files with SEEK_DATA/SEEK_HOLE.

Both readers are thread-safe: :class:`NbdReader` opens one libnbd connection per
reading thread (one connection serialises requests), :class:`FileReader` uses ``os.pread``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

from vmdr.errors import HypervisorError

MAX_REQUEST = 32 * 1024 * 1024  # the NBD maximum payload per read
EXTENT_WINDOW = 1024 * 1024 * 1024  # block_status request size
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1


def dirty_context(target: str) -> str:
    """The NBD meta context libvirt exports for the dirty bitmap of a pull backup."""
    return f"qemu:dirty-bitmap:backup-{target}"


class Extent(NamedTuple):
    """A byte range; ``is_data`` means allocated data (full) or dirty (incremental)."""

    offset: int
    length: int
    is_data: bool


class Reader(Protocol):
    """What a :class:`~vmdr.hypervisor.backup.DiskSource` reads from."""

    size: int

    def extents(self) -> Iterator[Extent]: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...


def merge(extents: Iterator[Extent]) -> Iterator[Extent]:
    """Coalesce adjacent extents of the same kind."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if cur is not None and cur.is_data == e.is_data and cur.offset + cur.length == e.offset:
            cur = Extent(cur.offset, cur.length + e.length, cur.is_data)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def entries_to_extents(
    offset: int, entries: list[int], end: int, data_flag: Callable[[int], bool]
) -> list[Extent]:
    """Turn libnbd's flat ``[length, flags, ...]`` list into extents clipped to ``end``."""
    out: list[Extent] = []
    pos = offset
    for i in range(0, len(entries) - 1, 2):
        length, flags = int(entries[i]), int(entries[i + 1])
        if pos >= end or length <= 0:
            break
        length = min(length, end - pos)
        out.append(Extent(pos, length, data_flag(flags)))
        pos += length
    return out


def allocation_is_data(flags: int) -> bool:
    """base:allocation: anything not known to read as zeros is data."""
    return not flags & STATE_ZERO


def dirty_is_data(flags: int) -> bool:
    """qemu:dirty-bitmap: flag 1 means dirty."""
    return bool(flags & STATE_DIRTY)


class NbdReader:
    """An NBD export read with libnbd, one connection per thread."""

    def __init__(self, connect: Callable[[Any], None], context: str, *, label: str) -> None:
        """``connect(handle)`` connects a fresh handle that already has ``context`` added."""
        self._connect = connect
        self.context = context
        self.label = label
        self._local = threading.local()
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._closed = False
        self.size = int(self._handle().get_size())

    def _handle(self) -> Any:
        h = getattr(self._local, "h", None)
        if h is not None:
            return h
        import nbd

        with self._lock:
            if self._closed:
                raise HypervisorError(f"{self.label}: reader is closed")
            h = nbd.NBD()
            h.set_handle_name(f"vmdr-{self.label}-{len(self._handles)}")
            if hasattr(h, "set_pread_initialize"):  # libnbd >= 1.12
                # no memset of every read buffer: a failed read raises and is discarded
                h.set_pread_initialize(False)
            h.add_meta_context(self.context)
            try:
                self._connect(h)
            except nbd.Error as exc:
                raise HypervisorError(f"{self.label}: NBD connect failed: {exc}") from exc
            if not h.can_meta_context(self.context):
                h.shutdown()
                raise HypervisorError(f"{self.label}: NBD server lacks {self.context}")
            self._handles.append(h)
        self._local.h = h
        return h

    def extents(self, window: int = EXTENT_WINDOW) -> Iterator[Extent]:
        """Extents over the whole export, reported in the reader's meta context."""
        import nbd

        h = self._handle()
        dirty = self.context.startswith("qemu:dirty-bitmap:")
        flag = dirty_is_data if dirty else allocation_is_data

        def window_extents(pos: int, count: int) -> list[Extent]:
            got: list[Extent] = []

            def cb(ctx: str, off: int, entries: list[int], err: Any) -> int:
                if ctx == self.context:
                    got.extend(entries_to_extents(off, entries, pos + count, flag))
                return 0

            try:
                h.block_status(count, pos, cb)
            except nbd.Error as exc:
                raise HypervisorError(f"{self.label}: block_status failed: {exc}") from exc
            if not got:
                raise HypervisorError(f"{self.label}: no extents at offset {pos}")
            return got

        def gen() -> Iterator[Extent]:
            pos = 0
            while pos < self.size:
                got = window_extents(pos, min(window, self.size - pos))
                yield from got
                pos = got[-1].offset + got[-1].length

        return merge(gen())

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (split into requests of at most 32 MiB)."""
        import nbd

        h = self._handle()
        parts: list[bytes] = []
        try:
            while length > 0:
                n = min(length, MAX_REQUEST)
                parts.append(bytes(h.pread(n, offset)))
                offset += n
                length -= n
        except nbd.Error as exc:
            raise HypervisorError(f"{self.label}: read failed: {exc}") from exc
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Disconnect every handle (qemu-nbd children exit)."""
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
        for h in handles:
            try:
                h.shutdown()
            except Exception:
                pass
            del h


def unix_export(socket_path: str, export: str, context: str) -> NbdReader:
    """A reader for export ``export`` of the NBD server at a unix socket."""

    def connect(h: Any) -> None:
        h.set_export_name(export)
        h.connect_unix(socket_path)

    return NbdReader(connect, context, label=export)


def image_export(path: str, fmt: str, *, label: str, bitmap: str | None = None) -> NbdReader:
    """A reader for an image file through a read-only ``qemu-nbd`` (socket activation);
    with ``bitmap``, its extents are that qcow2 dirty bitmap's (an incremental read)."""
    argv = ["qemu-nbd", "--read-only", f"--format={fmt}"]
    if bitmap:
        argv.append(f"--bitmap={bitmap}")
    argv.append(path)

    def connect(h: Any) -> None:
        h.connect_systemd_socket_activation(argv)

    ctx = f"qemu:dirty-bitmap:{bitmap}" if bitmap else BASE_ALLOCATION
    return NbdReader(connect, ctx, label=label)


# QEMU's image locking (block/file-posix.c): byte 100+bit is held for each permission a
# user has, byte 200+bit for each permission it does not share. Bits: 0 consistent read,
# 1 write, 3 resize.
_LOCK_PERM_WRITE = 101
_LOCK_TAKE = (100, 201, 203)  # we read; nobody may write or resize meanwhile


def _flock(kind: int, byte: int) -> bytes:
    return struct.pack("hhqqixxxx", kind, os.SEEK_SET, byte, 1, 0)


def qemu_lock(fd: int, label: str) -> None:
    """Lock an image the way a read-only QEMU would, so a VM cannot start writing it."""
    probe = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, _LOCK_PERM_WRITE))
    if struct.unpack("hhqqixxxx", probe)[0] != fcntl.F_UNLCK:
        raise HypervisorError(f"{label}: image is in use by a running QEMU")
    for byte in _LOCK_TAKE:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise HypervisorError(f"{label}: image is locked by another process") from exc
            raise


class FileReader:
    """A raw file or block device read directly; extents from SEEK_DATA/SEEK_HOLE.

    With ``lock``, the image is locked like QEMU does, so the domain cannot start
    (and write to it) while it is read.
    """

    def __init__(self, path: str, *, label: str, lock: bool = False) -> None:
        self.path = path
        self.label = label
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise HypervisorError(f"{label}: cannot open {path}: {exc}") from exc
        try:
            if lock:
                qemu_lock(self._fd, label)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise

    def extents(self) -> Iterator[Extent]:
        """Data and hole extents (the whole file is data if seeking is unsupported)."""
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                yield Extent(pos, self.size - pos, False)
                return
            if data > pos:
                yield Extent(pos, data - pos, False)
            try:
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), self.size)
            except OSError:
                hole = self.size
            yield Extent(data, hole - data, True)
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (zero-padded past the end of file)."""
        buf = os.pread(self._fd, length, offset)
        if len(buf) < length:
            buf += b"\0" * (length - len(buf))
        return buf

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
