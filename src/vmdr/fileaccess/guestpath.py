"""Paths inside a mounted guest filesystem, confined to it: a guest's symlink is resolved
relative to the guest's root and never leads to a host file."""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from vmdr.errors import UsageError

MAX_LINKS = 40


def resolve(root: str, path: str) -> str:
    """The host path of guest ``path`` (absolute or relative to the guest root)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, part)
        try:
            st = os.lstat(host)
        except OSError:
            raise UsageError(f"no such file or directory in the snapshot: /{path.lstrip('/')}") \
                from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise UsageError(f"too many levels of symbolic links: {path}")
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def _entry(host: str, name: str) -> dict[str, Any]:
    st = os.lstat(host)
    out: dict[str, Any] = {"name": name, "type": _kind(st.st_mode), "size": st.st_size,
                           "mode": stat.filemode(st.st_mode), "mtime": int(st.st_mtime)}
    if stat.S_ISLNK(st.st_mode):
        out["target"] = os.readlink(host)
    return out


def list_path(root: str, path: str) -> list[dict[str, Any]]:
    """Entries of a directory (sorted by name), or the one entry of a file."""
    host = resolve(root, path)
    if not os.path.isdir(host):
        return [_entry(host, os.path.basename(host) or "/")]
    return [_entry(os.path.join(host, n), n) for n in sorted(os.listdir(host))]


def _regular_only(directory: str, names: list[str]) -> set[str]:
    """copytree ignore: skip devices, FIFOs and sockets (copying a FIFO would block)."""
    skip = set()
    for n in names:
        mode = os.lstat(os.path.join(directory, n)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skip.add(n)
    return skip


def copy_out(root: str, path: str, dest: str) -> tuple[str, int, int]:
    """Copy guest ``path`` (file or directory tree, symlinks kept as links) to ``dest``
    (into it when it is an existing directory). Returns (written path, files, bytes)."""
    host = resolve(root, path)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(host.rstrip("/")) or "root")
    if os.path.lexists(dest):
        raise UsageError(f"{dest} exists; remove it or pick another destination")
    if os.path.isdir(host):
        shutil.copytree(host, dest, symlinks=True, ignore=_regular_only)
    elif os.path.isfile(host):
        shutil.copy2(host, dest)
    else:
        raise UsageError(f"{path} is not a regular file or directory")
    files = total = 0
    if os.path.isdir(dest):
        for dirpath, _dirs, names in os.walk(dest):
            for n in names:
                st = os.lstat(os.path.join(dirpath, n))
                if stat.S_ISREG(st.st_mode):
                    files += 1
                    total += st.st_size
    else:
        files, total = 1, os.path.getsize(dest)
    return dest, files, total
