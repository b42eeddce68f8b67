"""Reach a ``qemu+ssh://`` hypervisor host with OpenSSH: run commands, forward unix sockets.

Live backup over a remote URI needs three things on the hypervisor host that libvirt's
API does not offer: a directory for the NBD socket, scratch files and the state file; the
bytes of the NBD export; and (crash cleanup) the state file of an earlier run. vmdr gets
them over the same ssh login libvirt uses, with the parameters of the URI (user, host,
port, ``keyfile``, ``known_hosts``, ``no_verify``, ``command``):

* one **control master** per session (``ssh -M -N -S <private dir>/ctl``), started under
  ``setpriv --pdeathsig TERM`` so it dies with vmdr even on ``kill -9``; or, for replica
  cycles, the DR host's persistent master shared across processes
  (:mod:`vmdr.hypervisor.ssh_mux`, ``RemoteHost(shared=...)``);
* short commands multiplexed over it (``mkdir``/``chown``, state file ``cat``, ``rm``),
  each a fixed ``sh -c`` script whose arguments are quoted with :func:`shlex.join`;
* unix-socket forwarding (``ssh -O forward -L <private dir>/nbd.sock:<remote socket>``)
  into a 0700 directory of this host, so only this user can reach the export.

Why not TCP NBD: an NBD export on a TCP port is readable by anyone who can reach it
unless QEMU gets TLS credentials (libvirt ``<server tls='yes'>`` needs a PKI in
``/etc/pki/libvirt-backup`` on every host and a client certificate here). ssh already
authenticates and encrypts, and the socket never leaves the hypervisor host.

Secrets never appear in argv: only the key *path* is passed (``-i``); passwords in the URI
are ignored (vmdr runs ssh with ``BatchMode=yes``: keys or an agent only).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from vmdr.errors import HypervisorError, HypervisorUnavailable, RemoteFailed, UsageError

if TYPE_CHECKING:
    from .ssh_mux import SharedMaster

SSH_TRANSPORTS = frozenset({"ssh", "libssh", "libssh2"})
LOCAL_TRANSPORTS = frozenset({"", "unix"})
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:%\[\]-]+")  # host / user names we put in argv
CONNECT_TIMEOUT = 30


def transport_of(uri: str) -> str:
    """The libvirt transport of ``uri``: unix, ssh, libssh, libssh2, tcp, tls or ext."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    transport = scheme.split("+", 1)[1].lower() if "+" in scheme else ""
    if not transport:
        transport = "tls" if parts.hostname else "unix"
    return transport


def is_local_uri(uri: str) -> bool:
    """True when the hypervisor's files are this host's files.

    No hostname (``qemu:///system``, ``qemu+unix://``) is local; tcp/tls to a loopback
    name is local too (as before). An ssh transport is never local, even to 127.0.0.1: a
    loopback port is often a tunnel to another machine, and the ssh user may differ.
    """
    transport = transport_of(uri)
    if transport in SSH_TRANSPORTS:
        return False
    host = urlsplit(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in, from a ``qemu+ssh://`` URI (no secrets)."""

    host: str
    user: str | None = None
    port: int | None = None
    keyfile: str | None = None
    known_hosts: str | None = None
    no_verify: bool = False
    accept_new: bool = False  # libssh ``known_hosts_verify=auto``
    command: str = "ssh"
    transport: str = "ssh"
    compression: bool = False  # ``-o Compression=yes`` (replica feeds: data crosses a WAN)

    def __str__(self) -> str:
        """``user@host:port`` for messages and the state file."""
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{user}{host}{port}"

    def argv(self, *, control: str | None = None) -> list[str]:
        """``ssh`` with every option, up to and including ``--`` and the host."""
        out = [self.command, "-T", "-e", "none", "-o", "BatchMode=yes",
               "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=15",
               "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]
        if self.port:
            out += ["-p", str(self.port)]
        if self.user:
            out += ["-l", self.user]
        if self.keyfile:
            out += ["-i", self.keyfile, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            out += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.no_verify:
            out += ["-o", "StrictHostKeyChecking=no"]
        elif self.accept_new:
            out += ["-o", "StrictHostKeyChecking=accept-new"]
        if self.compression:
            out += ["-o", "Compression=yes"]
        if control:
            out += ["-S", control]
        return [*out, "--", self.host]


def _flag(value: str) -> bool:
    try:
        return int(value) != 0
    except ValueError:
        return value.strip().lower() in ("yes", "true")


def parse_ssh_uri(uri: str) -> SshTarget:
    """The ssh login of a ``qemu+ssh://`` (or ``+libssh``/``+libssh2``) URI.

    Raises UsageError for any other transport, with what to use instead.
    """
    transport = transport_of(uri)
    if transport not in SSH_TRANSPORTS:
        raise UsageError(f"a remote hypervisor's files and NBD exports are reached over ssh: "
                         f"use a qemu+ssh:// URI, not {transport}")
    parts = urlsplit(uri)
    host = parts.hostname
    if not host:
        raise UsageError("the qemu+ssh:// URI names no host")
    user = parts.username
    for what, value in (("host", host), ("user", user)):
        if value is not None and (value.startswith("-") or not _SAFE_NAME.fullmatch(value)):
            raise UsageError(f"the qemu+ssh:// URI has an unusable {what} name")
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError("the qemu+ssh:// URI has a bad port") from exc
    params = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    verify = params.get("known_hosts_verify", "normal").lower()
    if verify not in ("normal", "auto", "ignore"):
        raise UsageError(f"known_hosts_verify must be normal, auto or ignore, not {verify!r}")
    command = params.get("command") if transport == "ssh" else None
    return SshTarget(
        host=host, user=user, port=port,
        keyfile=params.get("keyfile") or None,
        known_hosts=params.get("known_hosts") or None,
        no_verify=_flag(params.get("no_verify", "0")) or verify == "ignore",
        accept_new=verify == "auto",
        command=command or "ssh",
        transport=transport,
    )


def private_base() -> str:
    """Where per-session 0700 directories for forwarded sockets go (short paths)."""
    if os.geteuid() == 0:
        os.makedirs("/run/vmdr", mode=0o755, exist_ok=True)
        return "/run/vmdr"
    return os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --``: the child dies with us, even on kill -9."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _first_line(data: bytes | str | None) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


class RemoteHost:
    """One ssh control master to the hypervisor host, with commands and forwards over it.

    With ``shared`` (:class:`.ssh_mux.SharedMaster`) the master is the persistent one of
    this user for the target, reused across processes; this host then only owns its
    private directory (forwarded sockets), its spawned commands and its forwards, which
    :meth:`close` cancels: the master stays for the next cycle."""

    def __init__(self, target: SshTarget, *, shared: SharedMaster | None = None) -> None:
        self.target = target
        self.shared = shared
        self.dir: str | None = None
        self._master: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._spawned: list[subprocess.Popen[bytes]] = []
        self._forwards: list[str] = []  # ``local:remote`` specs (cancelled on a shared master)

    @property
    def control(self) -> str:
        if self.shared is not None:
            return self.shared.control
        assert self.dir is not None
        return os.path.join(self.dir, "ctl")

    @property
    def pids(self) -> list[int]:
        """Local ssh processes of this host (recorded for crash cleanup; a shared master
        is not this process's)."""
        procs = [self._master, *self._spawned]
        return [p.pid for p in procs if p is not None and p.poll() is None]

    def start(self) -> RemoteHost:
        """Start the control master in a fresh private directory; do not wait for it
        (:meth:`open` waits). Call it from the thread that lives as long as the master:
        its parent-death signal fires when the starting thread ends."""
        if self.shared is not None:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="vmdr-ssh-", dir=private_base())
                self.shared.start()
            return self
        if self._master is not None:
            return self
        self.dir = tempfile.mkdtemp(prefix="vmdr-ssh-", dir=private_base())
        log_path = os.path.join(self.dir, "ssh.log")
        argv = [*_pdeathsig_prefix(), *self.target.argv(control=self.control)]
        argv[-2:-2] = ["-M", "-N", "-o", "ControlPersist=no", "-o", "ExitOnForwardFailure=yes",
                       "-o", "StreamLocalBindUnlink=yes", "-o", "StreamLocalBindMask=0177"]
        with open(log_path, "wb") as log:
            self._master = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=log,
                                            start_new_session=True)
        self._started = time.monotonic()
        return self

    def open(self, timeout: float = CONNECT_TIMEOUT + 15) -> RemoteHost:
        """Start the control master (unless :meth:`start` did) and wait until it is up."""
        if self.shared is not None:
            self.start()
            try:
                self.shared.wait(timeout)
            except BaseException:
                self.close()
                raise
            return self
        if self._master is None:
            self.start()
        elif os.path.exists(self.control):
            return self
        assert self._master is not None and self.dir is not None
        log_path = os.path.join(self.dir, "ssh.log")
        deadline = self._started + timeout
        while not os.path.exists(self.control):
            if self._master.poll() is not None or time.monotonic() > deadline:
                with open(log_path, "rb") as f:
                    why = _first_line(f.read())
                self.close()
                raise HypervisorUnavailable(f"ssh to {self.target} failed: {why}")
            time.sleep(0.02)
        return self

    def replace_master(self) -> None:
        """A shared master failed a command: end it and log in again (HypervisorUnavailable
        when that fails too)."""
        if self.shared is not None:
            self.shared.replace()

    def _need_master(self) -> None:
        if self.shared is not None:  # a shared master that went away meanwhile (stopped,
            if self.dir is None:     # its link died): ssh -S logs in by itself instead
                raise HypervisorUnavailable(f"ssh connection to {self.target} is not open")
            return
        if self._master is None or self._master.poll() is not None:
            raise HypervisorUnavailable(f"ssh connection to {self.target} is not open")

    def _argv(self, script: str, args: tuple[str, ...]) -> list[str]:
        self._need_master()
        return [*self.target.argv(control=self.control), shlex.join(["sh", "-c", script,
                                                                     "vmdr", *args])]

    def run(self, script: str, *args: str, input: bytes | None = None,
            ok: tuple[int, ...] = (0,), timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """Run ``sh -c script vmdr args...`` remotely; HypervisorError unless rc is in ``ok``."""
        try:
            p = subprocess.run(self._argv(script, args), input=input, capture_output=True,
                               timeout=timeout, check=False,
                               stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"remote command on {self.target} timed out") from exc
        if p.returncode not in ok:
            if p.returncode == 255:
                if self.shared is not None:  # its link may be dead: the next cycle logs in
                    self.shared.stop("exit")
                raise HypervisorUnavailable(f"ssh to {self.target} failed: "
                                            f"{_first_line(p.stderr)}")
            raise RemoteFailed(f"on {self.target}: {_first_line(p.stderr)}", p.returncode)
        return p

    def spawn(self, script: str, *args: str, ready: str, timeout: float = 60) -> \
            subprocess.Popen[bytes]:
        """Start a long-running remote script that prints ``ready`` once set up and runs
        until its stdin closes (we close it, or the connection dies with us)."""
        proc = subprocess.Popen(self._argv(script, args), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                self._stop(proc)
                raise HypervisorError(f"remote command on {self.target} did not start in time")
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                break
            line += chunk
        if line.strip() != ready.encode():
            try:
                _out, err = proc.communicate(input=b"", timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate()
            raise RemoteFailed(f"on {self.target}: {_first_line(err)}", proc.returncode)
        self._spawned.append(proc)
        return proc

    def release(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """End a spawned script by closing its stdin; kill it if it lingers."""
        self._stop(proc, timeout)
        with contextlib.suppress(ValueError):
            self._spawned.remove(proc)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def forward(self, name: str, remote_path: str) -> str:
        """Forward ``<private dir>/<name>`` to the remote unix socket; the local path."""
        return self.forward_all([(name, remote_path)])[0]

    def forward_all(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Forward ``<private dir>/<name>`` to each remote unix socket in one mux request;
        the local paths."""
        self._need_master()
        assert self.dir is not None
        local = [os.path.join(self.dir, name) for name, _r in pairs]
        specs = [f"{loc}:{remote}" for loc, (_n, remote) in zip(local, pairs, strict=True)]
        argv = [*self.target.argv(control=self.control)]
        argv[-2:-2] = ["-O", "forward", *[x for s in specs for x in ("-L", s)]]
        p = subprocess.run(argv, capture_output=True, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
        self._forwards += specs
        if p.returncode != 0 or not all(os.path.exists(x) for x in local):
            raise HypervisorError(f"ssh forwarding to {self.target} failed: "
                                  f"{_first_line(p.stderr)}")
        return local

    def _cancel_forwards(self) -> None:
        if not self._forwards or not os.path.exists(self.control):
            self._forwards = []
            return
        argv = [*self.target.argv(control=self.control)]
        argv[-2:-2] = ["-O", "cancel", *[x for s in self._forwards for x in ("-L", s)]]
        self._forwards = []
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(argv, capture_output=True, timeout=30, check=False,
                           stdin=subprocess.DEVNULL)

    def close(self) -> None:
        """Stop every spawned script and the master; remove the private directory."""
        for proc in list(self._spawned):
            self.release(proc, timeout=10)
        if self.shared is not None:
            self._cancel_forwards()  # the master stays for the next cycle; ours do not
            self.shared.release()
        if self._master is not None:
            if self._master.poll() is None:
                self._master.terminate()
                try:
                    self._master.wait(10)
                except subprocess.TimeoutExpired:
                    self._master.kill()
                    self._master.wait(10)
            self._master = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RemoteHost:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def reap(pids: list[int], marker: str) -> list[int]:
    """SIGTERM the processes of a crashed run that are still ours (their command line
    contains ``marker``, the private directory); the pids signalled."""
    import signal

    killed = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker and marker.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                killed.append(pid)
    return killed
