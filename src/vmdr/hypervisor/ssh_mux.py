"""One persistent ssh control master per DR host, shared by the vmdr processes of this user.

A replica cycle used to log in to the DR host twice (vmdr's control master and libvirt's
own ``qemu+ssh`` connection, at the same time): about 0.4 s of a cycle whatever changed,
every minute under the agent's scheduler. A shared master logs in once; every later cycle
(and libvirt's connection, through :meth:`SharedMaster.wrapper`) opens a session over it.

* **Where:** one 0700 directory owned by this user (``/run/vmdr/ssh-mux`` for root,
  ``$XDG_RUNTIME_DIR/vmdr-ssh-mux`` or ``/tmp/vmdr-ssh-mux-<uid>`` otherwise). A control
  socket is as good as a login to the DR host: a directory that is not ours, not a
  directory, or open to others is never used (:func:`mux_dir` returns None and the cycle
  falls back to a private master of its own, as before).
* **Which:** the socket's name is a hash of the whole ssh command (user, host, port, key
  file, known-hosts file, verification options) and of this process's network namespace,
  so a master is only ever shared by logins that would be identical.
* **How long:** ``ControlPersist`` = ``VMDR_SSH_PERSIST`` seconds idle (default 300; the
  agent's cycles run every minute), then ssh ends it by itself. ``VMDR_SSH_PERSIST=0``
  turns sharing off. The agent stops the masters when it exits (:func:`stop_masters`).
* **Dead masters:** a socket nobody listens on (the master died) is removed and a new
  master started; a master whose link died (the DR host rebooted) notices within
  ``ServerAliveInterval`` × ``ServerAliveCountMax`` (60 s) and exits; a command that
  fails with ssh's own error (exit 255) ends a shared master at once; and a cycle whose
  first command fails over a reused master replaces it and tries once more
  (:meth:`SharedMaster.replace`). Starting one takes a lock file, so two cycles starting at
  once do not race for the socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shlex
import socket
import stat
import subprocess
import time
from typing import IO

from .remote import CONNECT_TIMEOUT, SshTarget, private_base

PERSIST_ENV = "VMDR_SSH_PERSIST"
DEFAULT_PERSIST = 300  # seconds a master stays up with nothing using it


def persist_seconds() -> int:
    """``VMDR_SSH_PERSIST`` (seconds; 0 = no shared master), default 300."""
    raw = os.environ.get(PERSIST_ENV, "").strip()
    if not raw:
        return DEFAULT_PERSIST
    try:
        return max(0, int(raw))
    except ValueError:
        return DEFAULT_PERSIST


def _default_dir() -> str:
    if os.geteuid() == 0:
        return os.path.join(private_base(), "ssh-mux")
    run = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(run, "vmdr-ssh-mux") if run else f"/tmp/vmdr-ssh-mux-{os.geteuid()}"


def mux_dir(path: str | None = None) -> str | None:
    """The shared masters' directory, made 0700 if missing; None when it exists and is
    not a plain directory of this user closed to everyone else (never trust it then)."""
    path = path or _default_dir()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return path


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def _ns_tag() -> str:
    """This network namespace as a file-name prefix (``n4026531840-``)."""
    digits = "".join(c for c in _netns() if c.isdigit())
    return f"n{digits}-" if digits else ""


def master_key(target: SshTarget) -> str:
    """Who may share a master: the same ssh command in the same network namespace (the
    namespace also prefixes the name, so :func:`stop_masters` stops only its own)."""
    ident = "\0".join([*target.argv(), _netns()])
    return _ns_tag() + hashlib.sha256(ident.encode()).hexdigest()[:20]


def listening(path: str) -> bool:
    """True when a master accepts connections on ``path``; a socket file nobody listens
    on (its master died) is removed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False
    finally:
        s.close()


class SharedMaster:
    """The shared control master of one ssh target (see the module docstring)."""

    def __init__(self, target: SshTarget, directory: str, persist: int) -> None:
        self.target, self.dir, self.persist = target, directory, persist
        key = master_key(target)
        self.control = os.path.join(directory, f"{key}.sock")
        self._lock_path = os.path.join(directory, f"{key}.lock")
        self._log_path = os.path.join(directory, f"{key}.log")
        self._wrapper = os.path.join(directory, f"{key}.ssh")
        self._libvirt = os.path.join(directory, f"{key}.lv")
        self._lock: IO[bytes] | None = None
        self._starter: subprocess.Popen[bytes] | None = None
        self.reused = False  # the master was up before this process started it

    # -- start -------------------------------------------------------------------------

    def start(self) -> SharedMaster:
        """Reuse a listening master, or start one without waiting (:meth:`wait` waits)."""
        if self._starter is not None:
            return self
        self._lock = open(self._lock_path, "ab")  # noqa: SIM115 (held until wait())
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # another cycle may be starting it
        if listening(self.control):
            self.reused = True
            self._unlock()
            return self
        self.reused = False
        argv = self.target.argv(control=self.control)
        argv[-2:-2] = ["-M", "-N", "-f", "-o", f"ControlPersist={self.persist}"]
        with open(self._log_path, "wb") as log:  # the parent's errors; it exits when the
            self._starter = subprocess.Popen(    # login is done, the master stays behind
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)
        return self

    def wait(self, timeout: float = CONNECT_TIMEOUT + 15) -> None:
        """Wait until the master is up; HypervisorUnavailable (exit 12) when it is not."""
        from vmdr.errors import HypervisorUnavailable

        starter, self._starter = self._starter, None
        try:
            if starter is not None:
                try:
                    rc = starter.wait(timeout)
                except subprocess.TimeoutExpired:
                    starter.kill()
                    starter.wait(10)
                    rc = -1
                if rc != 0 or not listening(self.control):
                    with open(self._log_path, "rb") as f:
                        why = _last_line(f.read())
                    raise HypervisorUnavailable(f"ssh to {self.target} failed: {why}")
            elif not os.path.exists(self.control):
                raise HypervisorUnavailable(f"ssh connection to {self.target} is not open")
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def replace(self) -> None:
        """End the master (its link is dead or it failed a command) and start another."""
        self.stop("exit")
        with contextlib.suppress(OSError):
            os.unlink(self.control)
        self.start()
        self.wait()

    def stop(self, how: str = "stop") -> None:
        """``ssh -O stop`` (no new sessions; it ends when the running ones do) or
        ``-O exit`` (now)."""
        argv = self.target.argv(control=self.control)
        argv[-2:-2] = ["-O", how]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=15,
                           check=False)

    def release(self) -> None:
        """This process is done with the master: it stays for the next cycle. A start
        that was never waited for is waited for (so no half-started login is left)."""
        if self._starter is not None:
            with contextlib.suppress(Exception):
                self.wait()
        self._unlock()

    # -- libvirt's connection over the master -----------------------------------------------

    def libvirt_socket(self) -> str | None:
        """The DR host's system libvirt socket as an earlier cycle over this master saw it
        (:meth:`remember_libvirt_socket`), or None."""
        try:
            with open(self._libvirt, encoding="utf-8") as f:
                path = f.read().strip()
        except OSError:
            return None
        return path if path.startswith("/") and "\n" not in path else None

    def remember_libvirt_socket(self, path: str | None) -> None:
        """Record (or, with None, forget) the DR host's libvirt socket for the next
        cycles: they connect libvirt through a forward of it (no remote shell, no
        ``virt-ssh-helper``)."""
        if path is None:
            with contextlib.suppress(OSError):
                os.unlink(self._libvirt)
            return
        if path == self.libvirt_socket():
            return
        tmp = f"{self._libvirt}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(path)
        os.replace(tmp, self._libvirt)

    def wrapper(self) -> str:
        """A 0700 script that runs the target's ssh over this master (falling back to a
        login of its own when the master is gone): libvirt's ``command=`` for the
        ``qemu+ssh://`` connection to the same host."""
        text = ("#!/bin/sh\n# vmdr: libvirt's ssh over the shared control master\n"
                f"exec {shlex.quote(self.target.command)} -o ControlMaster=no "
                f"-o {shlex.quote('ControlPath=' + self.control)} \"$@\"\n")
        with contextlib.suppress(OSError), open(self._wrapper, encoding="utf-8") as f:
            if f.read() == text:
                return self._wrapper
        tmp = f"{self._wrapper}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self._wrapper)
        return self._wrapper


def libvirt_uri(uri: str, wrapper: str) -> str:
    """``uri`` (``qemu+ssh://``) with libvirt's ssh command set to ``wrapper``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() != "command"]
    query.append(("command", wrapper))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def stop_masters(directory: str | None = None) -> int:
    """Ask every shared master of this user in this network namespace to stop (``ssh -O
    stop``: running sessions finish, no new ones start, then it exits; a cycle still
    running logs in again for its next command); the number asked. The agent calls it
    when it exits."""
    d = mux_dir(directory) if directory or os.path.isdir(_default_dir()) else None
    if d is None:
        return 0
    n = 0
    for name in sorted(os.listdir(d)):
        if not name.endswith(".sock") or not name.startswith(_ns_tag()):
            continue  # another network namespace's (a test host's) masters are not ours
        path = os.path.join(d, name)
        if not listening(path):
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["ssh", "-S", path, "-O", "stop", "vmdr-mux"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=15,
                           check=False)
            n += 1
        deadline = time.monotonic() + 5
        while listening(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    return n


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"
