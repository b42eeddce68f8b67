"""Local disk images as sources and targets: raw files, block devices, and any format
qemu understands (qcow2, vmdk, …) through ``qemu-nbd`` driven by libnbd.

A source reports its allocated extents, so backups never read holes; a target writes
sparse output, so restores never write zeros to a file.

A file target is written under a hidden temporary name in the same directory
(``.NAME.<random>.vmdr-partial``), fsynced, renamed over the final name and the directory
fsynced: a restore killed at any point (even ``kill -9``) never leaves a partial image
under the final name, and ``--force`` keeps the old file until the new one is complete.
Block devices are written in place (they cannot be renamed).

Raw files and block devices are read and written with ``O_DIRECT`` where the kernel and
filesystem allow it (page-aligned buffers from :func:`aligned_buffer`, 4 KiB-aligned
offsets): a restore then costs no page-cache copy and leaves no gigabytes of dirty pages
behind, and a backup does not fill the cache with an image it reads once. Anything
unaligned (a disk's last partial block) and any filesystem that refuses ``O_DIRECT``
(tmpfs, some network filesystems) goes through the page cache as before.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import secrets
import stat
import subprocess
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from vmdr.errors import NoSpace, UsageError, VmdrError
from vmdr.timeutil import utcnow

MAX_REQUEST = 32 << 20
log = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".vmdr-partial"
ALIGN = 4096  # O_DIRECT alignment that suits every logical block size up to 4 KiB
USE_DIRECT = hasattr(os, "O_DIRECT")  # tests turn it off to cover the buffered path


def aligned_buffer(size: int) -> memoryview:
    """A writable, page-aligned buffer of *size* bytes (an anonymous mapping), as
    ``O_DIRECT`` needs; a slice that starts at 0 stays aligned."""
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def _open_direct(path: str, flags: int) -> int | None:
    """*path* opened with ``O_DIRECT`` as well, or None where that is not supported."""
    if not USE_DIRECT:
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def partial_name(path: str) -> str:
    """A fresh hidden temporary name next to *path* (same directory, same filesystem)."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def fsync_dir(path: str) -> None:
    """fsync the directory *path* (makes a rename or a new file durable)."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: str, path: str) -> None:
    """fsync *tmp*, rename it over *path* and fsync the directory: after a crash the
    final name holds either the old file or the whole new one."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise _enospc(exc, path) from None


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a small file (domain XML, NVRAM) completely or not at all, with *mode*."""
    tmp = partial_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        commit_file(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def sweep_partials(path: str, idle: float = 900.0) -> list[str]:
    """Remove temporary files that killed restores to *path* left behind, once nothing
    has written to them for *idle* seconds (a running restore keeps its file fresh)."""
    d, base = os.path.split(os.path.abspath(path))
    removed: list[str] = []
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    now = utcnow().timestamp()
    for e in entries:
        # ".NAME.<rand>.vmdr-partial", or nested "..NAME.<r1>.vmdr-partial.<r2>.vmdr-partial"
        if (e.name.startswith(".") and e.name.lstrip(".").startswith(f"{base}.")
                and e.name.endswith(PARTIAL_SUFFIX)
                and e.is_file(follow_symlinks=False)):
            try:
                if now - e.stat(follow_symlinks=False).st_mtime >= idle:
                    os.unlink(e.path)
                    removed.append(e.path)
                    log.info("removed %s, left by a killed restore", e.path)
            except OSError:
                pass
    return removed


def check_target(path: str, overwrite: bool) -> tuple[str, bool]:
    """Where a restore to *path* really writes, and whether that is a block device.

    A symlink is followed (the file it names is replaced, not the link). Refused with
    ``UsageError``: an existing file without *overwrite*, a directory, anything that is
    neither a regular file nor a block device (``/dev/null`` must never be renamed over),
    and a path whose directory does not exist."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise UsageError(f"{path}: directory {parent} does not exist") from None
        return real, False
    if stat.S_ISBLK(st.st_mode):
        return real, True
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is neither a regular file nor a block device")
    if not overwrite:
        raise UsageError(f"{path} exists; use --force to overwrite it")
    return real, False


def discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` as a dict; raises ``UsageError`` for unreadable images."""
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", path],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
    except FileNotFoundError:
        raise VmdrError("qemu-img is not installed (apt-get install qemu-utils)") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or "").strip().splitlines()[-1:] or ["unreadable image"]
        raise UsageError(f"{path}: {last[0]}") from None
    info: dict[str, Any] = json.loads(out)
    return info


def _direct_ok(path: str) -> bool:
    """Whether *path*'s filesystem takes ``O_DIRECT`` (so qemu-nbd may use cache=none)."""
    fd = _open_direct(path, os.O_RDONLY)
    if fd is None:
        return False
    os.close(fd)
    return True


def _nbd_handle(path: str, fmt: str, readonly: bool) -> Any:
    import nbd

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    if hasattr(h, "set_pread_initialize"):  # libnbd >= 1.12: no memset before each read
        h.set_pread_initialize(False)
    # Writing, cache=none (O_DIRECT) where the filesystem allows: qemu-nbd then copies
    # nothing into the page cache (a qcow2 restore of the benchmark image: qemu-nbd's CPU
    # 4.7 -> 1.9 s); the final flush makes it durable either way.
    cache = "none" if readonly or _direct_ok(path) else "unsafe"
    args = ["qemu-nbd", f"--format={fmt}", f"--cache={cache}"]
    if readonly:
        args += ["--read-only", "--share=4"]
    else:
        args += ["--discard=unmap", "--detect-zeroes=unmap"]
    h.connect_systemd_socket_activation([*args, path])
    return h


class Source(ABC):
    size: int
    format: str

    @abstractmethod
    def extents(self) -> Iterator[tuple[int, int]]:
        """Yield ``(offset, length)`` of ranges that may hold data, ascending."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Read bytes; thread-safe."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawSource(Source):
    """A raw file or block device, read with ``pread``; holes found by SEEK_DATA/SEEK_HOLE."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.format = "raw"
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        self._dfd = self._dfd_open = _open_direct(path, os.O_RDONLY)
        self._local = threading.local()

    def extents(self) -> Iterator[tuple[int, int]]:
        if self.is_block:
            yield 0, self.size
            return
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                raise
            hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            yield data, hole - data
            pos = hole

    def read(self, offset: int, length: int) -> bytes:
        dfd = self._dfd
        if dfd is not None and offset % ALIGN == 0 and 0 < length <= 64 << 20:
            want = _round_up(length)
            buf: memoryview | None = getattr(self._local, "buf", None)
            if buf is None or len(buf) < want:
                buf = self._local.buf = aligned_buffer(max(want, 4 << 20))
            try:
                n = min(os.preadv(dfd, [buf[:want]], offset), length)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._dfd = None  # took the open, refused the read: buffered from now on
            else:
                data = bytes(buf[:n])  # one copy, instead of the page cache's two
                if n < length and offset + n < self.size:  # a short direct read: finish
                    data += os.pread(self.fd, length - n, offset + n)
                return data
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        self._dfd = None
        if self._dfd_open is not None:  # closed only here: another thread may be reading
            dfd, self._dfd_open = self._dfd_open, None
            os.close(dfd)
        os.close(self.fd)


class NbdSource(Source):
    """Any qemu format, read through a private read-only ``qemu-nbd``."""

    def __init__(self, path: str, fmt: str, conns: int = 2) -> None:
        self.path, self.format = path, fmt
        self._handles = [_nbd_handle(path, fmt, True) for _ in range(conns)]
        self._free = list(self._handles)
        self._cv = threading.Condition()
        self.size = int(self._handles[0].get_size())

    def extents(self) -> Iterator[tuple[int, int]]:
        h = self._handles[0]
        pos = 0
        found: list[tuple[int, int]] = []
        while pos < self.size:
            found.clear()
            count = min(self.size - pos, 1 << 30)

            def cb(ctx: str, off: int, entries: list[int], err: Any, *_: Any) -> int:
                if ctx == "base:allocation":
                    o = off
                    for i in range(0, len(entries), 2):
                        found.append((o, entries[i] if not entries[i + 1] & 2 else -entries[i]))
                        o += entries[i]
                return 0

            with self._cv:
                h.block_status(count, pos, cb)
            if not found:
                break
            for off, ln in found:
                if ln > 0:
                    yield off, ln
                pos = off + abs(ln)

    def read(self, offset: int, length: int) -> bytes:
        with self._cv:
            while not self._free:
                self._cv.wait()
            h = self._free.pop()
        try:
            return bytes(h.pread(length, offset))
        finally:
            with self._cv:
                self._free.append(h)
                self._cv.notify()

    def close(self) -> None:
        for h in self._handles:
            try:
                h.shutdown()
            except Exception:
                pass


def open_source(path: str) -> Source:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or device")
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return RawSource(path)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not a disk image or block device")
    fmt = image_info(path).get("format", "raw")
    if fmt == "raw":
        return RawSource(path)
    return NbdSource(path, fmt)


class Target(ABC):
    @abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Write non-zero data; ranges never written read back as zeros."""

    def close(self) -> None:
        """Make the image durable and put it under its final name."""

    def abort(self) -> None:
        """Give up: remove what was written; an older file at the final name stays."""


def _enospc(exc: OSError, path: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on device writing {path}")
    return VmdrError(f"{path}: {exc.strerror}")


class RawTarget(Target):
    """A sparse raw file (or a block device, where holes are written as zeros)."""

    def __init__(self, path: str, size: int, overwrite: bool = False) -> None:
        self.path = path
        self.real, self.is_block = check_target(path, overwrite)
        if not self.is_block:
            sweep_partials(self.real)
        self.tmp = self.real if self.is_block else partial_name(self.real)
        try:
            flags = os.O_WRONLY | (0 if self.is_block else os.O_CREAT | os.O_EXCL)
            self.fd = os.open(self.tmp, flags, 0o600)
        except OSError as exc:
            raise _enospc(exc, path) from None
        self._dfd: int | None = None
        self._dfd_open: int | None = None
        try:
            if not self.is_block:
                os.ftruncate(self.fd, size)
            self._dfd = self._dfd_open = _open_direct(self.tmp, os.O_WRONLY)
        except OSError as exc:
            self.abort()
            raise _enospc(exc, path) from None
        self.size = size

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise _enospc(exc, self.path) from None

    def write_from(self, offset: int, buf: memoryview) -> None:
        """Write *buf*, a slice from the start of an :func:`aligned_buffer`, at *offset*:
        with ``O_DIRECT`` where both are aligned (the page cache is bypassed), the
        unaligned tail and everything else through the page cache. Durable at
        :meth:`close` either way (one fsync covers both)."""
        dfd = self._dfd
        if dfd is not None and offset % ALIGN == 0:
            body = len(buf) - len(buf) % ALIGN
            done = 0
            try:
                while done < body:
                    n = os.pwrite(dfd, buf[done:body], offset + done)
                    if n <= 0 or n % ALIGN:
                        done += n
                        break
                    done += n
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise _enospc(exc, self.path) from None
                self._dfd = None  # opened, but refused the write: buffered from now on
            buf, offset = buf[done:], offset + done
        if len(buf):
            self.write(offset, buf)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.is_block:
            self.write(offset, bytes(length))

    def _close_fd(self) -> None:
        self._dfd = None
        if self._dfd_open is not None:  # closed only here, never under a writing thread
            dfd, self._dfd_open = self._dfd_open, None
            os.close(dfd)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _enospc(exc, self.path) from None
        finally:
            self._close_fd()
        if not self.is_block:
            commit_file(self.tmp, self.real)

    def abort(self) -> None:
        try:
            self._close_fd()
        except OSError:
            pass
        if not self.is_block:
            discard(self.tmp)


class NbdTarget(Target):
    """A new qcow2/vmdk image written through ``qemu-nbd``."""

    def __init__(self, path: str, size: int, fmt: str, overwrite: bool = False) -> None:
        self.real, is_block = check_target(path, overwrite)
        if is_block:
            raise UsageError(f"{path} is a block device: restore to it with --format raw")
        self.path = path
        sweep_partials(self.real)
        self.tmp = partial_name(self.real)
        opts = ["-o", "subformat=monolithicSparse"] if fmt == "vmdk" else []
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *opts, self.tmp, str(size)],
                           check=True, capture_output=True, text=True, timeout=60)
            os.chmod(self.tmp, 0o600)
            self.h: Any = _nbd_handle(self.tmp, fmt, False)
        except subprocess.CalledProcessError as exc:
            discard(self.tmp)
            msg = (exc.stderr or "").strip().splitlines()[-1:] or ["qemu-img create failed"]
            if "space" in msg[0].lower():
                raise NoSpace(f"no space left on device creating {path}") from None
            raise VmdrError(f"{path}: {msg[0]}") from None
        except BaseException:
            discard(self.tmp)
            raise

    def write(self, offset: int, data: bytes) -> None:
        import nbd

        try:
            self.h.pwrite(data, offset)
        except nbd.Error as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "space" in str(exc).lower():
                raise NoSpace(f"no space left on device writing {self.path}") from None
            raise VmdrError(f"{self.path}: {exc.string}") from None

    def _release(self) -> None:
        """Close the handle: libnbd waits for its qemu-nbd to exit, so every write has
        reached the file."""
        h, self.h = self.h, None
        del h

    def close(self) -> None:
        import nbd

        try:
            self.h.flush()
            self.h.shutdown()
        except nbd.Error as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left on device writing {self.path}") from None
            raise VmdrError(f"{self.path}: {exc.string}") from None
        self._release()
        commit_file(self.tmp, self.real)

    def abort(self) -> None:
        if self.h is not None:
            try:
                self.h.shutdown()
            except Exception:  # already broken: closing is all that is left
                pass
            self._release()
        discard(self.tmp)


def open_target(path: str, size: int, fmt: str, overwrite: bool = False) -> Target:
    if fmt == "raw":
        return RawTarget(path, size, overwrite)
    if fmt in ("qcow2", "vmdk"):
        return NbdTarget(path, size, fmt, overwrite)
    raise UsageError(f"unknown image format {fmt!r} (raw, qcow2 or vmdk)")
