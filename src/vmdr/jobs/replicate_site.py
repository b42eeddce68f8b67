"""The DR host's side of a replica: the standby directory, its qcow2 disks, their restore
points (internal snapshots), the state file, and a writable NBD export of each disk.

The same small ``sh -c`` scripts run here (a local target: ``qemu:///system``) or on the
DR host over one key-authenticated OpenSSH control master (no ssh compression: the
changed data goes as zstd-or-raw frames, :mod:`vmdr.jobs.replica_frames`) (a ``qemu+ssh://``
target; :class:`vmdr.hypervisor.remote.RemoteHost`). A standby disk is written through
``qemu-nbd`` serving it on a unix socket in a fresh 0700 directory at the target; over
ssh that socket is forwarded into a 0700 directory here (``ssh -O forward``), so the
export is never on a TCP port and only this user reaches it. ``qemu-nbd`` lives exactly
as long as the ssh channel that started it (it stops when its stdin closes, also when
vmdr dies).
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import time
from dataclasses import replace
from urllib.parse import parse_qsl, urlsplit

from vmdr.errors import (
    HypervisorError,
    HypervisorUnavailable,
    NoSpace,
    ReplicaInUse,
    UsageError,
    VmdrError,
)
from vmdr.hypervisor import is_local_uri, parse_ssh_uri, ssh_mux
from vmdr.hypervisor.remote import RemoteHost
from vmdr.hypervisor.ssh_mux import SharedMaster
from vmdr.jobs.replica_scripts import (
    _BEGIN,
    _COMMIT,
    _CREATE,
    _FREE,
    _LIST_STATES,
    _MARK,
    _NBD,
    _PINNED,
    _PROBE,
    _READ,
    _SERVE,
    _SNAP,
    _SNAP_LIST,
    _STANDBY,
    _WRITE,
    Probe,
    begin_libvirt_socket,
    commit_args,
    parse_begin_pins,
    parse_begin_probe,
    parse_probe,
    serve_args,
    standby_request,
)
from vmdr.jobs.replica_writers import (
    DiskWriter,
    Exports,
    FrameSender,
    StreamWriter,
    _helper_source,
    _last_line,
)

__all__ = ["DiskWriter", "Exports", "Site", "_last_line", "check_dir", "end_session", "read_line"]

_Begun = tuple[tuple[str, list[str]], tuple[int, list[bytes | None]]]
# URI parameters that only say how ssh logs in (libvirt over a forwarded socket is fine)
_PLAIN_PARAMS = frozenset({"keyfile", "known_hosts", "known_hosts_verify", "no_verify",
                           "no_tty", "command"})


def end_session(proc: subprocess.Popen[bytes], wait_s: float) -> bytes:
    """Close *proc*'s stdin, let it end (killed after *wait_s*), and return what its stderr
    holds, then close its pipes. The read never blocks: over a shared ssh control master
    the session's pipes may still be held by the master (it received the descriptors)
    after the client process is gone."""
    with contextlib.suppress(OSError, ValueError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    err = b""
    with contextlib.suppress(OSError, ValueError):
        if proc.stderr is not None and select.select([proc.stderr], [], [], 2)[0]:
            err = os.read(proc.stderr.fileno(), 65536)
    for f in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError, ValueError):
            if f is not None:
                f.close()
    return err


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line *proc* writes to its stdout, stripped; "" when it ends or is silent
    for *timeout* seconds first (a line cut short comes back as it is)."""
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            break
        c = os.read(proc.stdout.fileno(), 1)
        if not c:
            break
        line += c
    return line.decode(errors="replace").strip()


class Site:
    """The DR host of one replica target URI (local or ``qemu+ssh://``)."""

    def __init__(self, uri: str, *, compress: bool = True, stream: bool | None = None,
                 shared: bool = False) -> None:
        self.uri = uri
        self.local = is_local_uri(uri)
        # over ssh the changes go as frames to a helper at the target, compressed by vmdr
        # with zstd (``compress``), not by ssh: ssh's zlib is slow on data that does not
        # compress; a local site writes the NBD exports directly
        self.stream = (not self.local) if stream is None else stream
        self.compress = compress
        self._host: RemoteHost | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._forwards = 0
        self._begun: _Begun | None = None
        self._pins: dict[str, set[str]] = {}
        # the serving process after a framed stream was acknowledged: the cycle's commit
        # goes into it (one ssh session less per cycle); None when there is none
        self._pending: subprocess.Popen[bytes] | None = None
        self._standby: subprocess.Popen[bytes] | None = None  # see :meth:`ready_next`
        self._shared: SharedMaster | None = None
        self._probes: dict[str, Probe] = {}
        if not self.local:
            target = replace(parse_ssh_uri(uri), compression=False)  # UsageError for tcp/tls
            persist = ssh_mux.persist_seconds() if shared else 0
            base = ssh_mux.mux_dir() if persist else None
            if base is not None:  # the persistent master of this DR host (replica cycles)
                self._shared = SharedMaster(target, base, persist)
            self._host = RemoteHost(target, shared=self._shared)
        self.where = "this host" if self.local else str(self._host.target if self._host
                                                        else uri)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Site:
        """Start the ssh login without waiting for it (:meth:`open` waits)."""
        if self._host is not None:
            self._host.start()
        return self

    def open(self) -> Site:
        if self._host is not None:
            self._host.open()  # HypervisorUnavailable when the DR host cannot be reached
        return self

    @property
    def reused(self) -> bool:
        """The ssh master was up before this cycle (a shared one, see :mod:`.ssh_mux`)."""
        return self._shared is not None and self._shared.reused

    def replace_master(self) -> None:
        """The shared master failed a command: end it and log in again."""
        if self._host is not None:
            self._host.replace_master()

    def ready_next(self) -> None:
        """Open the session of the cycle's next step (*serve*, or *commit* when nothing
        moves) now, over ssh: its channel and the DR host's login shell start while the
        source side works (libvirt's checks, the backup job), and the step then starts
        at once (:data:`_STANDBY`)."""
        if self._standby is not None:
            return
        self._standby = subprocess.Popen(self._argv(_STANDBY, ()), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True)
        self._procs.append(self._standby)

    def _start(self, script: str, args: list[str]) -> subprocess.Popen[bytes]:
        """``sh -c script`` at the target with its stdin, stdout and stderr piped: in the
        session :meth:`ready_next` opened when it is still there, else a new one."""
        proc, self._standby = self._standby, None
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(standby_request(script, args))
                return proc
            except OSError:
                pass  # it died meanwhile: a session of its own
        if proc is not None:
            self._stop(proc)
        proc = subprocess.Popen(self._argv(script, tuple(args)), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    def libvirt_forward(self) -> str | None:
        """A local socket forwarded, over a reused shared master, to the DR host's system
        libvirt socket (as an earlier cycle's *begin* found it): libvirt's connection then
        needs no remote shell at all. None when there is no such master or socket, or
        the URI asks for anything but the plain system instance."""
        if self._shared is None or not self._shared.reused or self._host is None:
            return None
        parts = urlsplit(self.uri)
        params = {k.lower() for k, _v in parse_qsl(parts.query, keep_blank_values=True)}
        if parts.path.rstrip("/") != "/system" or params - _PLAIN_PARAMS:
            return None
        remote = self._shared.libvirt_socket()
        if remote is None:
            return None
        try:
            return self._host.forward_all([("libvirt.sock", remote)])[0]
        except VmdrError:
            self.forget_libvirt_socket()
            return None

    def forget_libvirt_socket(self) -> None:
        """The forwarded libvirt socket did not work: the next cycles use the wrapper."""
        if self._shared is not None:
            with contextlib.suppress(OSError):
                self._shared.remember_libvirt_socket(None)

    def libvirt_uri(self) -> str:
        """The URI for libvirt's connection to this DR host: over the shared master when
        there is one (``command=`` a wrapper, ssh transport only), else the site's URI."""
        if self._shared is None or parse_ssh_uri(self.uri).transport != "ssh":
            return self.uri
        return ssh_mux.libvirt_uri(self.uri, self._shared.wrapper())

    def close(self) -> None:
        for p in list(self._procs):
            self._stop(p)
        self._procs.clear()
        if self._host is not None:
            self._host.close()

    def __enter__(self) -> Site:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands --------------------------------------------------------------------------

    def _argv(self, script: str, args: tuple[str, ...]) -> list[str]:
        if self._host is None:
            return ["sh", "-c", script, "vmdr", *args]
        h = self._host
        return [*h.target.argv(control=h.control), shlex.join(["sh", "-c", script, "vmdr",
                                                               *args])]

    def run(self, script: str, *args: str, input: bytes | None = None,
            ok: tuple[int, ...] = (0,), timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        if self._host is not None:
            return self._host.run(script, *args, input=input, ok=ok, timeout=timeout)
        try:
            p = subprocess.run(self._argv(script, args), input=input, capture_output=True,
                               timeout=timeout, check=False,
                               stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"a command on {self.where} timed out") from exc
        if p.returncode not in ok:
            raise HypervisorError(f"on {self.where}: {_last_line(p.stderr)}")
        return p

    def free_bytes(self, directory: str) -> int:
        p = self.run(_FREE, directory)
        try:
            return int(p.stdout.decode().strip())
        except ValueError:
            raise HypervisorError(f"cannot tell the free space of {directory} on "
                                  f"{self.where}") from None

    def make_dir(self, directory: str) -> None:
        self.run('mkdir -p -m 0755 -- "$1"', directory)

    def need_space(self, directory: str, needed: int) -> None:
        """NoSpace (exit 9) unless ``needed`` bytes (plus 1 % and 64 MiB for qcow2
        metadata) fit in ``directory`` at the target."""
        free = self.free_bytes(directory)
        want = needed + needed // 100 + (64 << 20)
        if free < want:
            raise NoSpace(f"not enough space for the replica in {directory} on {self.where}: "
                          f"{free >> 20} MiB free, this cycle needs {want >> 20} MiB")

    def read(self, path: str) -> bytes | None:
        p = self.run(_READ, path, ok=(0, 3))
        return None if p.returncode == 3 else p.stdout

    def write(self, path: str, data: bytes) -> None:
        try:
            self.run(_WRITE, path, input=data)
        except VmdrError as exc:
            if "space" in exc.message.lower():
                raise NoSpace(f"no space left on {self.where} writing {path}") from None
            raise

    def create_image(self, path: str, size: int) -> None:
        try:
            self.run(_CREATE, path, str(size))
        except VmdrError as exc:
            if "space" in exc.message.lower():
                raise NoSpace(f"no space left on {self.where} creating {path}") from None
            raise

    def snapshots(self, path: str) -> list[str]:
        return [ln for ln in self.run(_SNAP_LIST, path).stdout.decode().split() if ln]

    def add_snapshot(self, path: str, tag: str) -> None:
        self.run(_SNAP, path, "-c", tag)

    def delete_snapshots(self, path: str, tags: list[str]) -> None:
        if tags:
            self.run(_SNAP, path, "-d", *tags)

    def pinned_points(self, directory: str) -> set[str]:
        """Restore points a running test failover reads (``test-*/pin`` files whose shared
        ``flock`` is held, see :mod:`.failover_site`): a cycle must not delete them."""
        seen = self._pins.pop(directory, None)
        if seen is not None:  # read by this cycle's begin, under the replica lock that a
            return seen       # test failover also takes to pin: none can appear since
        out = self.run(_PINNED, directory).stdout.decode().split()
        return {ln for ln in out if ln}

    def probe(self, directory: str) -> Probe:
        """What runs over the standby's disks in ``directory`` (the HA marker, a
        failover's record, overlays and whether a process holds them): read by this
        cycle's begin, else one command (see :mod:`.replica_guard`)."""
        seen = self._probes.pop(directory, None)
        if seen is not None:
            return seen
        out = self.run(_PROBE, directory).stdout.decode(errors="replace")
        return parse_probe(out.splitlines())

    def mark_in_use(self, directory: str, marker: bytes) -> None:
        """Write the HA copy's marker (``ha-inuse.json``) atomically into ``directory``."""
        self.run(_MARK, directory, input=marker)

    def state_files(self, root: str) -> list[str]:
        return [ln for ln in self.run(_LIST_STATES, root).stdout.decode().splitlines() if ln]

    # -- batched steps of a cycle --------------------------------------------------------------

    def prefetch(self, directory: str, names: list[str]) -> None:
        """Run :meth:`begin` now (while something else waits, e.g. libvirt's login); the
        next ``begin`` with the same arguments returns this answer once."""
        self._begun = ((directory, list(names)), self.begin(directory, names))

    def begin(self, directory: str, names: list[str]) -> tuple[int, list[bytes | None]]:
        """Create ``directory``; its free bytes and the files ``names`` in it (None for
        one that does not exist), in one command."""
        early: _Begun | None = getattr(self, "_begun", None)
        self._begun = None
        if early is not None and early[0] == (directory, list(names)):
            return early[1]
        out = self.run(_BEGIN, directory, *names).stdout
        try:
            free, files, self._pins[directory] = parse_begin_pins(out, len(names))
            self._probes[directory] = parse_begin_probe(out, len(names))
        except ValueError:
            raise HypervisorError(f"cannot read {directory} on {self.where}") from None
        if self._shared is not None:
            with contextlib.suppress(OSError):
                self._shared.remember_libvirt_socket(begin_libvirt_socket(out))
        return free, files

    def commit(self, files: list[tuple[str, bytes]], tag: str, images: list[str],
               drop: list[str]) -> None:
        """Take restore point ``tag`` on every image and delete the tags in ``drop``
        where present, then write ``files`` (atomically, 0600, in order: the state last);
        one command."""
        args, data = commit_args(files, tag, images, drop)
        proc, self._pending = self._pending, None
        try:
            if proc is not None:
                self._commit_over(proc, shlex.join(args), data)
            elif self._standby is not None:
                self._finish_in(self._start(_COMMIT, args), data)
            else:
                self.run(_COMMIT, *args, input=data)
        except VmdrError as exc:
            # the commit script's own words when an HA copy's marker appeared meanwhile
            # (exit 7, whichever session it ran in)
            if "replica in use:" in exc.message:
                raise ReplicaInUse(exc.message) from None
            if "space" in exc.message.lower():
                raise NoSpace(f"no space left on {self.where} ({exc.message})") from None
            raise

    def _commit_over(self, proc: subprocess.Popen[bytes], line: str, data: bytes) -> None:
        """The commit in the serving process whose stream was acknowledged (see
        :data:`_SERVE`): its arguments as one line, the files' bytes, end of input."""
        assert proc.stdin is not None
        try:
            if "\n" in line or proc.poll() is not None:  # cannot go as one line: apart
                self._stop(proc)
                self.run(_COMMIT, *shlex.split(line), input=data)
                return
            self._finish_in(proc, line.encode() + b"\n" + data)
        finally:
            self._stop(proc)

    def _finish_in(self, proc: subprocess.Popen[bytes], data: bytes) -> None:
        """Write ``data`` to the running step's stdin, close it, wait for the step to end;
        HypervisorError with its last error line unless it ended well."""
        assert proc.stdin is not None
        try:
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except OSError:
                pass  # it ended: its error comes below
            try:
                rc = proc.wait(600)
            except subprocess.TimeoutExpired:
                raise HypervisorError(f"a command on {self.where} timed out") from None
            err = proc.stderr.read() if proc.stderr else b""
            if rc == 255 and self._host is not None:
                raise HypervisorUnavailable(f"ssh to {self.where} failed: {_last_line(err)}")
            if rc != 0:
                raise HypervisorError(f"on {self.where}: {_last_line(err)}")
        finally:
            self._stop(proc)

    def serve(self, state: tuple[str, bytes] | None,
              disks: list[tuple[str, int | None, bool]], fmt: str = "qcow2") -> Exports:
        """Write the state file, create the missing disks (``(image, size or None,
        serve)``) and serve those marked read-write over NBD, in one remote process; one
        ``ssh -O forward`` for all their sockets."""
        args, data = serve_args(state, fmt, disks, _helper_source() if self.stream else "",
                                _COMMIT if self.stream else "")
        proc = self._start(_SERVE, args)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if data:
                proc.stdin.write(data)
            proc.stdin.flush()
        except OSError:
            pass  # the script failed early: its error comes below
        text = read_line(proc, 120)
        if not text.startswith("ready "):
            err = self._stop_failed(proc)
            what = _last_line(err)
            if "space" in what.lower():
                raise NoSpace(f"no space left on {self.where} ({what})")
            if what.startswith("replica in use:"):
                raise ReplicaInUse(f"on {self.where}: {what}")
            raise HypervisorError(f"cannot serve the standby disks on {self.where}: {what}")
        remote_dir = text[len("ready "):]
        served = [img for img, _s, serve in disks if serve]
        socks = [f"{remote_dir}/{i}.sock" for i in range(1, len(served) + 1)]
        ex = Exports(self, proc)
        mode = read_line(proc, 60) if self.stream and served else "forward"
        if mode in ("zstd", "raw"):
            ex.stream = FrameSender(proc, self.compress and mode == "zstd")
            for i, img in enumerate(served):
                ex.writers[img] = StreamWriter(ex.stream, i, img, self.where)
            return ex
        if mode != "forward":
            ex.close(flush=False)
            raise HypervisorError(f"cannot serve the standby disks on {self.where}: "
                                  f"{mode or 'the helper did not start'}")
        try:
            local = self._forward_all(socks)
            for img, sock in zip(served, local, strict=True):
                ex.writers[img] = DiskWriter(sock, img, self.where, lambda: None)
        except BaseException:
            ex.close(flush=False)
            raise
        return ex

    def _forward_all(self, socks: list[str]) -> list[str]:
        """Local paths for the remote sockets: the same paths on a local site; else every
        socket forwarded into the session's private 0700 directory in one mux request."""
        if self._host is None or not socks:
            return socks
        pairs = []
        for remote in socks:
            self._forwards += 1
            pairs.append((f"w{self._forwards}.sock", remote))
        return self._host.forward_all(pairs)

    # -- a writable NBD export of one standby disk -------------------------------------------

    def writer(self, path: str, fmt: str = "qcow2") -> DiskWriter:
        """Serve ``path`` (qcow2 or ``fmt``, at the target) read-write and connect to it."""
        argv = self._argv(_NBD, (path, fmt))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self._procs.append(proc)
        text = read_line(proc, 60)
        if not text.startswith("ready "):
            err = self._stop_failed(proc)
            raise HypervisorError(f"cannot serve {path} on {self.where}: {_last_line(err)}")
        remote_sock = text[len("ready "):]
        sock = remote_sock
        if self._host is not None:
            self._forwards += 1
            name = f"w{self._forwards}.sock"  # in this session's private 0700 directory
            sock = self._host.forward(name, remote_sock)
        return DiskWriter(sock, path, self.where, lambda: self._stop(proc))

    def spawn(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        """Run ``script`` at the target in the background, stdin/stdout piped; it is
        stopped (stdin closed) by :meth:`stop` or :meth:`close`."""
        proc = subprocess.Popen(self._argv(script, args), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        self._stop(proc)

    def _stop_failed(self, proc: subprocess.Popen[bytes]) -> bytes:
        """Stop a command that did not get ready; what it wrote to stderr (read before
        its pipes are closed)."""
        err = end_session(proc, 60)
        self._stop(proc)
        return err

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)


def check_dir(directory: str) -> str:
    """An absolute, plain standby directory (it goes into shell arguments, quoted)."""
    if not directory.startswith("/") or "\n" in directory or "/../" in directory + "/":
        raise UsageError(f"replica directory must be an absolute path: {directory!r}")
    return directory.rstrip("/") or "/"
