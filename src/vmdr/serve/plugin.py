"""nbdkit Python plugin serving one disk of a vmdr snapshot (run by nbdkit, not imported).

nbdkit embeds the system Python 3 and loads this file as a script. It gets one
parameter, ``setup=FILE``: a private JSON file (mode 0600 in a 0700 directory, written
by :func:`vmdr.serve.start_server`) holding the repository location, the exported key,
the snapshot and the disk. The file is read and unlinked in ``config_complete``, so key
material never appears in argv, the environment or a log. The file also carries the
calling process's ``sys.path``, so vmdr and its compiled wheels (cp311, like nbdkit's
Python) import from the same virtualenv.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import sys
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit at run time

API_VERSION = 2

_setup_path: str | None = None
_setup: dict[str, Any] = {}
_disk: Any = None  # vmdr.serve.export.ServedDisk once ready


def config(key: str, value: str) -> None:
    global _setup_path
    if key != "setup":
        raise RuntimeError(f"unknown parameter {key!r} (only setup=FILE)")
    _setup_path = value


def config_complete() -> None:
    global _setup
    if not _setup_path:
        raise RuntimeError("missing setup=FILE")
    try:
        st = os.lstat(_setup_path)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.geteuid():
            raise RuntimeError(f"{_setup_path}: setup file must be a private 0600 file")
        with io.open(_setup_path, encoding="utf-8") as f:  # noqa: UP020 - open is ours
            _setup = json.load(f)
    finally:
        try:
            os.unlink(_setup_path)
        except FileNotFoundError:
            pass
    for entry in reversed(_setup.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def _open() -> tuple[Any, Any]:
    from vmdr.repository.opening import OpenOptions, open_repository

    keyfile = _setup.get("keyfile")
    # no lock: the process that started nbdkit holds a shared one while it serves
    repo = open_repository(OpenOptions(str(_setup["url"]),
                                       key_data=base64.b64decode(keyfile) if keyfile else None,
                                       use_cache=False), None)
    snap = repo.load_snapshot(str(_setup["snapshot"]))
    disks = {d.name: d for d in snap.disks}
    name = str(_setup["disk"])
    if name not in disks:
        repo.close()
        raise RuntimeError(f"snapshot {snap.short_id} has no disk {name!r}")
    return repo, disks[name]


def get_ready() -> None:
    """Open the repository and the snapshot once, so a bad setup fails before serving."""
    repo, _ = _open()
    repo.close()


def after_fork() -> None:
    """Open for real: connections and threads made before a fork would not survive it."""
    global _disk
    from vmdr.serve.export import ServedDisk

    repo, disk = _open()
    _setup.pop("keyfile", None)
    _disk = ServedDisk(repo, disk, cache_chunks=int(_setup.get("cache_chunks", 24)),
                       readahead=int(_setup.get("readahead", 6)),
                       workers=int(_setup.get("workers", 4)))


def cleanup() -> None:
    if _disk is not None:
        _disk.close()


def default_export(readonly: int, is_tls: int) -> str:
    return str(_setup.get("disk", ""))


def list_exports(readonly: int, is_tls: int) -> list[str]:
    return [str(_setup.get("disk", ""))]


def _count_client(mark: bytes) -> None:
    """Note a client connecting (+) or leaving (-) in ``<disk>.clients`` next to the setup
    file: vmdr waits for QEMU's NBD client to be back on a restarted server."""
    if not _setup_path:
        return
    try:
        fd = os.open(os.path.splitext(_setup_path)[0] + ".clients",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, mark + b"\n")
        finally:
            os.close(fd)
    except OSError:
        pass  # only a hint for the caller; serving goes on


def open(readonly: int) -> int:
    _count_client(b"+")
    return 1


def close(h: int) -> None:
    _count_client(b"-")


def get_size(h: int) -> int:
    return int(_disk.size)


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_extents(h: int) -> bool:
    return True


def is_rotational(h: int) -> bool:
    return False


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_NATIVE)


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    _disk.pread_into(buf, offset)


def cache(h: int, count: int, offset: int, flags: int) -> None:
    end = min(_disk.size, offset + count)
    for idx in range(offset // _disk.cs, (end + _disk.cs - 1) // _disk.cs):
        _disk.chunk(idx)


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    return [(e.offset, e.length, hole if e.hole else 0) for e in _disk.extents(offset, count)]
