"""Local directory backend: one file per object, written to a temporary name, fsynced
and renamed into place, so a crash never leaves a partial object under its real name."""

from __future__ import annotations

import errno
import os
import secrets
import urllib.parse
from collections.abc import Iterator

from vmdr.errors import NoSpace, ObjectNotFound, StorageError
from vmdr.storage.base import Backend, ObjectInfo, validate_name
from vmdr.storage.registry import register

TMP_SUFFIX = ".tmp"


def _translate(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # ENOTDIR: a parent is a plain file
        return ObjectNotFound(f"no such object: {what}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on device writing {what}")
    return StorageError(f"{what}: {exc.strerror}")


class FileBackend(Backend):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.display_url = self.root
        self._made_dirs: set[str] = set()

    def _path(self, name: str) -> str:
        return os.path.join(self.root, validate_name(name))

    def create(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StorageError(f"{self.root} exists and is not a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise _translate(exc, self.root) from None

    def get(self, name: str) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except OSError as exc:
            raise _translate(exc, name) from None

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except OSError as exc:
            raise _translate(exc, name) from None

    def _ensure_dir(self, d: str) -> None:
        if d not in self._made_dirs:
            os.makedirs(d, exist_ok=True)
            self._made_dirs.add(d)

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = f"{path}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            self._ensure_dir(os.path.dirname(path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _translate(exc, name) from None

    def put_if_absent(self, name: str, data: bytes) -> bool:
        if os.path.exists(self._path(name)):
            return False
        self.put(name, data)
        return True

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except OSError as exc:
            raise _translate(exc, name) from None

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(name))
        except OSError as exc:
            raise _translate(exc, name) from None
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._walk(prefix, temporary=False)

    def list_temporary(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._walk(prefix, temporary=True)

    def _walk(self, prefix: str, temporary: bool) -> Iterator[ObjectInfo]:
        base = self._path(prefix)
        stack = [base]
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise _translate(exc, prefix) from None
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.endswith(TMP_SUFFIX) != temporary:
                    continue
                else:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    rel = os.path.relpath(e.path, self.root).replace(os.sep, "/")
                    yield ObjectInfo(rel, st.st_size, st.st_mtime)


def _factory(parts: urllib.parse.SplitResult) -> Backend:
    return FileBackend(urllib.parse.unquote(parts.path))


register("file", _factory, "a local directory: /path or file:///path")
