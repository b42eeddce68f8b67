"""SFTP backend (paramiko).

URL: ``sftp://user[:password]@host[:port]/abs/path[?key=FILE&known_hosts=FILE&timeout=S]``.
The URL path is always absolute: ``sftp://u@h/srv/repo`` stores under ``/srv/repo``
(``sftp://u@h//srv/repo`` means the same). Paths relative to the login directory are
not supported.

Authentication, in paramiko's order: the key file from ``?key=`` or ``$VMDR_SFTP_KEY``
(when given, ssh-agent and ``~/.ssh/id_*`` are not tried), else ssh-agent and the
default keys; then the password from the URL or ``$VMDR_SFTP_PASSWORD``.

Host keys are always checked against ``/etc/ssh/ssh_known_hosts``,
``~/.ssh/known_hosts`` and the file from ``?known_hosts=`` or
``$VMDR_SFTP_KNOWN_HOSTS``; an unknown host is refused.

One SSH transport is shared by all threads; each call borrows an SFTP channel from a
small pool (OpenSSH allows 10 sessions per connection by default). A dropped
connection raises ``TransientStorageError`` and the next call reconnects.

``put`` writes ``name.<random>.tmp`` and renames it into place with
``posix-rename@openssh.com``; ``list`` never reports ``*.tmp`` files. OpenSSH's SFTP
protocol reports a full disk only as a generic failure, so ``NoSpace`` is raised only
when the server's message says so.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import queue
import secrets
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from vmdr.errors import (
    AuthenticationFailed,
    NoSpace,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UsageError,
)
from vmdr.storage.base import Backend, ObjectInfo, validate_name
from vmdr.storage.registry import redact, register

if TYPE_CHECKING:
    import paramiko

T = TypeVar("T")
TMP_SUFFIX = ".tmp"
CONNECT_TIMEOUT = 15.0
MAX_CHANNELS = 8
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split()) or "unknown error"


class SFTPBackend(Backend):
    """Objects as files under a directory of an SSH server."""

    def __init__(
        self,
        host: str,
        path: str,
        *,
        port: int = 22,
        username: str | None = None,
        password: str | None = None,
        key_file: str | None = None,
        known_hosts: str | None = None,
        timeout: float = 60.0,
        display_url: str = "",
    ) -> None:
        if not path.startswith("/"):
            raise UsageError(f"sftp path must be absolute: {path!r}")
        self.host, self.port, self.username = host, port, username
        self.root = posixpath.normpath("/" + path.lstrip("/"))
        self._password = password
        self._key_file = key_file
        self._known_hosts = known_hosts
        self._timeout = timeout
        user = f"{username}@" if username else ""
        self.display_url = display_url or f"sftp://{user}{host}:{port}{self.root}"
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._generation = 0
        self._idle: queue.LifoQueue[tuple[int, paramiko.SFTPClient]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(MAX_CHANNELS)
        self._made_dirs: set[str] = set()
        self._closed = False

    # -- connection management -------------------------------------------------------

    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self) -> paramiko.SSHClient:
        import paramiko

        client = paramiko.SSHClient()
        for f in ("/etc/ssh/ssh_known_hosts", os.path.expanduser("~/.ssh/known_hosts")):
            if os.path.exists(f):
                client.load_system_host_keys(f)
        if self._known_hosts:
            try:
                client.load_system_host_keys(os.path.expanduser(self._known_hosts))
            except OSError as exc:
                raise StorageError(
                    f"cannot read known_hosts {self._known_hosts}: {exc.strerror}"
                ) from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pkey = self._load_key() if self._key_file else None
        limit = min(CONNECT_TIMEOUT, self._timeout)
        try:
            client.connect(
                self.host, port=self.port, username=self.username, password=self._password,
                pkey=pkey, allow_agent=pkey is None,
                look_for_keys=pkey is None, timeout=limit, banner_timeout=limit,
                auth_timeout=limit, channel_timeout=limit,
            )
        except paramiko.AuthenticationException:
            client.close()
            raise AuthenticationFailed(
                f"sftp: {self.username or 'user'}@{self._where()} refused the credentials"
            ) from None
        except paramiko.BadHostKeyException:
            client.close()
            raise StorageError(
                f"sftp: host key of {self._where()} does not match known_hosts "
                "(possible man-in-the-middle attack)"
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            if "known_hosts" in str(exc):
                raise StorageError(
                    f"sftp: host key of {self._where()} is unknown; add it to "
                    "~/.ssh/known_hosts or pass ?known_hosts=FILE"
                ) from None
            if "authentication methods" in str(exc):
                raise AuthenticationFailed(
                    f"sftp: no key, agent or password to log in to {self._where()} with"
                ) from None
            raise TransientStorageError(f"sftp: {self._where()}: {_one_line(exc)}") from None
        except (OSError, EOFError) as exc:
            client.close()
            reason = getattr(exc, "strerror", None) or _one_line(exc)
            raise TransientStorageError(
                f"sftp: cannot connect to {self._where()}: {reason}"
            ) from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)
        return client

    def _load_key(self) -> paramiko.PKey:
        import paramiko

        path = os.path.expanduser(self._key_file or "")
        try:
            return paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            raise UsageError(
                f"sftp: key file {path} is encrypted; load it into ssh-agent instead"
            ) from None
        except OSError as exc:  # a wrong ?key= or VMDR_SFTP_KEY: configuration, not storage
            raise UsageError(f"sftp: cannot read key file {path}: {exc.strerror}") from None
        except (paramiko.SSHException, ValueError) as exc:
            raise UsageError(f"sftp: unusable key file {path}: {_one_line(exc)}") from None

    def _transport_active(self) -> bool:
        client = self._client
        transport = client.get_transport() if client else None
        return transport is not None and transport.is_active()

    def _acquire(self) -> tuple[int, paramiko.SFTPClient]:
        if self._closed:
            raise StorageError(f"sftp: backend for {self.display_url} is closed")
        with self._lock:
            client = self._client
            if client is None or not self._transport_active():
                if client is not None:
                    client.close()
                    self._client = None
                client = self._client = self._connect()
                self._generation += 1
            generation = self._generation
        while True:
            try:
                gen, sftp = self._idle.get_nowait()
            except queue.Empty:
                break
            if gen == generation:
                return gen, sftp
            sftp.close()
        try:
            sftp = client.open_sftp()
        except Exception as exc:
            raise self._translate(exc, "open sftp channel") from None
        sftp.get_channel().settimeout(self._timeout)  # type: ignore[union-attr]
        return generation, sftp

    def _run(self, what: str, fn: Callable[[paramiko.SFTPClient], T]) -> T:
        """Run *fn* with a pooled SFTP channel, translating every error."""
        with self._slots:
            gen, sftp = self._acquire()
            ok = False
            try:
                result = fn(sftp)
                ok = True
                return result
            except (StorageError, NoSpace, UsageError):
                ok = True
                raise
            except Exception as exc:
                # An SFTP status error (OSError, not a socket failure) leaves it usable.
                ok = (
                    isinstance(exc, OSError)
                    and not isinstance(exc, TimeoutError | ConnectionError)
                    and self._transport_active()
                )
                raise self._translate(exc, what) from None
            finally:
                if ok and gen == self._generation:
                    self._idle.put((gen, sftp))
                else:
                    sftp.close()

    def _translate(self, exc: BaseException, what: str) -> Exception:
        import paramiko

        err = getattr(exc, "errno", None)
        text = _one_line(getattr(exc, "strerror", None) or exc)
        if isinstance(exc, OSError) and err == errno.ENOENT:
            return ObjectNotFound(f"no such object: {what}")
        if err in (errno.ENOSPC, errno.EDQUOT) or "no space" in text.lower():
            return NoSpace(f"no space left on {self._where()} writing {what}")
        if isinstance(exc, TimeoutError):
            return TransientStorageError(f"sftp: {what}: timed out talking to {self._where()}")
        if (
            isinstance(exc, EOFError | paramiko.SSHException)
            or err in _TRANSIENT_ERRNOS
            or not self._transport_active()
        ):
            return TransientStorageError(
                f"sftp: {what}: connection to {self._where()} lost ({text})"
            )
        if err == errno.EACCES:
            return StorageError(f"sftp: {what}: permission denied")
        return StorageError(f"sftp: {what}: {text}")

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                _, sftp = self._idle.get_nowait()
            except queue.Empty:
                break
            sftp.close()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- objects -----------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, validate_name(name))

    def _mkdirs(self, sftp: paramiko.SFTPClient, d: str) -> None:
        if d in self._made_dirs or d == "/":
            return
        try:
            st = sftp.stat(d)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self._mkdirs(sftp, posixpath.dirname(d))
            try:
                sftp.mkdir(d)
            except OSError as failed:  # fine if another writer made it meanwhile
                try:
                    ok = stat.S_ISDIR(sftp.stat(d).st_mode or 0)
                except OSError:
                    ok = False
                if not ok:
                    raise failed from None
        else:
            if not stat.S_ISDIR(st.st_mode or 0):
                raise StorageError(f"sftp: {d} exists and is not a directory") from None
        self._made_dirs.add(d)

    def create(self) -> None:
        self._run(self.root, lambda sftp: self._mkdirs(sftp, self.root))

    def get(self, name: str) -> bytes:
        path = self._path(name)

        def op(sftp: paramiko.SFTPClient) -> bytes:
            with sftp.open(path, "rb") as f:
                size = f.stat().st_size or 0
                f.prefetch(size)
                return f.read(size) if size else b""

        return self._run(name, op)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)

        def op(sftp: paramiko.SFTPClient) -> bytes:
            with sftp.open(path, "rb") as f:
                if length <= 0:
                    return b""
                f.seek(offset)
                return f.read(length)

        return self._run(name, op)

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        parent = posixpath.dirname(path)
        tmp = f"{path}.{secrets.token_hex(6)}{TMP_SUFFIX}"

        def write(sftp: paramiko.SFTPClient) -> None:
            with sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)

        def op(sftp: paramiko.SFTPClient) -> None:
            self._mkdirs(sftp, parent)
            try:
                try:
                    write(sftp)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    self._made_dirs.discard(parent)  # removed behind our back: remake
                    self._mkdirs(sftp, parent)
                    write(sftp)
                sftp.posix_rename(tmp, path)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except Exception:
                    pass
                raise

        self._run(name, op)

    def delete(self, name: str) -> None:
        path = self._path(name)
        self._run(name, lambda sftp: sftp.remove(path))

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        st = self._run(name, lambda sftp: sftp.stat(path))
        return ObjectInfo(name, st.st_size or 0, float(st.st_mtime or 0))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._walk(prefix, temporary=False)

    def list_temporary(self, prefix: str) -> Iterator[ObjectInfo]:
        return self._walk(prefix, temporary=True)

    def _walk(self, prefix: str, temporary: bool) -> Iterator[ObjectInfo]:
        stack = [self._path(prefix)]
        while stack:
            d = stack.pop()
            try:
                entries = self._run(prefix, functools.partial(_listdir, path=d))
            except ObjectNotFound:
                continue
            for e in entries:
                full = posixpath.join(d, e.filename)
                if stat.S_ISDIR(e.st_mode or 0):
                    stack.append(full)
                elif e.filename.endswith(TMP_SUFFIX) == temporary:
                    rel = posixpath.relpath(full, self.root)
                    yield ObjectInfo(rel, e.st_size or 0, float(e.st_mtime or 0))


def _listdir(sftp: paramiko.SFTPClient, path: str) -> list[paramiko.SFTPAttributes]:
    return sftp.listdir_attr(path)


def _factory(parts: urllib.parse.SplitResult) -> Backend:
    if not parts.hostname:
        raise UsageError("sftp URL needs a host: sftp://user@host/path")
    query = dict(urllib.parse.parse_qsl(parts.query))
    password = parts.password
    password = urllib.parse.unquote(password) if password else os.environ.get("VMDR_SFTP_PASSWORD")
    try:
        port = parts.port or 22
        timeout = float(query.get("timeout", 60))
    except ValueError as exc:
        raise UsageError(f"invalid sftp URL: {_one_line(exc)}") from None
    path = urllib.parse.unquote(parts.path)
    if path.strip("/") == "":
        raise UsageError("sftp URL needs a directory: sftp://user@host/absolute/path")
    return SFTPBackend(
        parts.hostname,
        path,
        port=port,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=password or None,
        key_file=query.get("key") or os.environ.get("VMDR_SFTP_KEY") or None,
        known_hosts=query.get("known_hosts") or os.environ.get("VMDR_SFTP_KNOWN_HOSTS") or None,
        timeout=timeout,
        display_url=redact(parts.geturl()),
    )


register("sftp", _factory, "an SSH server: sftp://user@host[:port]/absolute/path")
