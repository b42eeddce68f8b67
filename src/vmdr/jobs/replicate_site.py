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
import errno
import os
import queue
import select
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vmdr.errors import HypervisorError, NoSpace, ReplicaInUse, UsageError, VmdrError
from vmdr.hypervisor import is_local_uri, parse_ssh_uri
from vmdr.hypervisor.remote import RemoteHost
from vmdr.jobs import replica_frames
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
    _WRITE,
    Probe,
    commit_args,
    parse_begin_pins,
    parse_begin_probe,
    parse_probe,
    serve_args,
)

_Begun = tuple[tuple[str, list[str]], tuple[int, list[bytes | None]]]


def _last_line(data: bytes | None) -> str:
    lines = [ln.strip() for ln in (data or b"").decode(errors="replace").splitlines()
             if ln.strip()]
    return lines[-1] if lines else "no error output"


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

    def __init__(self, uri: str, *, compress: bool = True, stream: bool | None = None) -> None:
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
        self._probes: dict[str, Probe] = {}
        if not self.local:
            target = parse_ssh_uri(uri)  # UsageError for tcp/tls: data must go over ssh
            self._host = RemoteHost(replace(target, compression=False))
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
            return free, files
        except ValueError:
            raise HypervisorError(f"cannot read {directory} on {self.where}") from None

    def commit(self, files: list[tuple[str, bytes]], tag: str, images: list[str],
               drop: list[str]) -> None:
        """Take restore point ``tag`` on every image and delete the tags in ``drop``
        where present, then write ``files`` (atomically, 0600, in order: the state last);
        one command."""
        args, data = commit_args(files, tag, images, drop)
        try:
            p = self.run(_COMMIT, *args, input=data, ok=(0, 7))
            if p.returncode == 7:
                raise ReplicaInUse(f"on {self.where}: {_last_line(p.stderr)}")
        except ReplicaInUse:
            raise
        except VmdrError as exc:
            if "space" in exc.message.lower():
                raise NoSpace(f"no space left on {self.where} ({exc.message})") from None
            raise

    def serve(self, state: tuple[str, bytes] | None,
              disks: list[tuple[str, int | None, bool]], fmt: str = "qcow2") -> Exports:
        """Write the state file, create the missing disks (``(image, size or None,
        serve)``) and serve those marked read-write over NBD, in one remote process; one
        ``ssh -O forward`` for all their sockets."""
        args, data = serve_args(state, fmt, disks, _helper_source() if self.stream else "")
        proc = subprocess.Popen(self._argv(_SERVE, tuple(args)), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        self._procs.append(proc)
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
        h = self._host
        assert h.dir is not None
        local, argv = [], [*h.target.argv(control=h.control)]
        opts = ["-O", "forward"]
        for remote in socks:
            self._forwards += 1
            path = os.path.join(h.dir, f"w{self._forwards}.sock")
            opts += ["-L", f"{path}:{remote}"]
            local.append(path)
        argv[-2:-2] = opts
        p = subprocess.run(argv, capture_output=True, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
        if p.returncode != 0 or not all(os.path.exists(x) for x in local):
            raise HypervisorError(f"ssh forwarding to {self.where} failed: "
                                  f"{_last_line(p.stderr)}")
        return local

    # -- a writable NBD export of one standby disk -------------------------------------------

    def writer(self, path: str, fmt: str = "qcow2") -> DiskWriter:
        """Serve ``path`` (qcow2 or ``fmt``, at the target) read-write and connect to it."""
        argv = self._argv(_NBD, (path, fmt))
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self._procs.append(proc)
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 60
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                break
            c = os.read(proc.stdout.fileno(), 1)
            if not c:
                break
            line += c
        text = line.decode(errors="replace").strip()
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
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        err = b""
        if proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                err = proc.stderr.read()
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


def _helper_source() -> str:
    from vmdr.jobs import replica_frames

    with open(replica_frames.__file__, encoding="utf-8") as f:
        return f.read()


class FrameSender:
    """The framed stream into the one serving process at the target (its stdin). A
    thread writes the frames into the pipe (to ssh) while the caller compresses the next
    piece: zstd's pass and ssh's encryption overlap."""

    def __init__(self, proc: subprocess.Popen[bytes], compress: bool) -> None:
        self.proc = proc
        self.sent = 0  # bytes on the wire (after zstd)
        self._z: Callable[[bytes], bytes] | None = None
        if compress:
            import zstandard

            self._z = zstandard.ZstdCompressor(level=replica_frames.LEVEL).compress
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._broken = False
        self._thread = threading.Thread(target=self._pump, name="vmdr-replica-send",
                                        daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdin is not None
        while (data := self._q.get()) is not None:
            if self._broken:
                continue  # drain: the caller sees the failure on its next send
            try:
                self.proc.stdin.write(data)
            except (OSError, ValueError):
                self._broken = True

    def send(self, data: bytes) -> None:
        if self._broken:
            raise self.failure()
        self._q.put(data)
        self.sent += len(data)

    def data(self, disk: int, offset: int, data: bytes) -> None:
        self.send(replica_frames.data_frame(disk, offset, data, self._z))

    def zero(self, disk: int, offset: int, length: int) -> None:
        self.send(replica_frames.frame(replica_frames.ZERO, disk, offset, length))

    def stop(self) -> None:
        """End the writing thread (after what is queued)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def finish(self, where: str) -> None:
        """The end frame; then the helper's ``ok`` after it flushed every disk."""
        self.send(replica_frames.frame(replica_frames.END, 0, 0, 0))
        self.stop()
        if self._broken:
            raise self.failure(where)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        if not line.startswith("ok "):
            raise self.failure(where)

    def failure(self, where: str = "the DR host") -> VmdrError:
        """The helper's one error line (it stopped: a corrupt stream, a full disk)."""
        if threading.current_thread() is not self._thread:
            self._broken = True
            self.stop()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        err = self.proc.stderr.read() if self.proc.stderr else b""
        what = _last_line(err)
        if "space" in what.lower():
            return NoSpace(f"no space left on {where} ({what})")
        return HypervisorError(f"writing the standby disks on {where}: {what}")


class Exports:
    """The NBD exports of one :meth:`Site.serve`: a writer per served image; closing
    flushes each and ends the one remote process serving them all."""

    def __init__(self, site: Site, proc: subprocess.Popen[bytes]) -> None:
        self.site, self.proc = site, proc
        self.writers: dict[str, DiskWriter] = {}
        self.stream: FrameSender | None = None

    def close(self, *, flush: bool = True) -> None:
        first: BaseException | None = None
        if self.stream is not None:
            try:
                if flush:
                    self.stream.finish(self.site.where)
            finally:
                self.stream._broken = True  # nothing more is written (a failed cycle)
                self.stream.stop()
                self.writers = {}
                self.site._stop(self.proc)
            return
        try:
            for w in self.writers.values():
                try:
                    w.close(flush=flush)
                except VmdrError as exc:
                    first = first or exc
        finally:
            self.writers = {}
            self.site._stop(self.proc)
        if first is not None:
            raise first


class DiskWriter:
    """Writes into one standby disk over NBD: data, zeroes, flush."""

    def __init__(self, sock: str, path: str, where: str, stop: Any) -> None:
        import nbd

        self.path, self.where = path, where
        self._stop = stop
        self._h = nbd.NBD()
        try:
            self._h.connect_unix(sock)
        except nbd.Error as exc:
            stop()
            raise HypervisorError(f"cannot reach the NBD export of {path} on {where}: "
                                  f"{exc.string}") from None
        self.size = int(self._h.get_size())

    def _fail(self, exc: Any) -> VmdrError:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "space" in str(exc).lower():
            return NoSpace(f"no space left on {self.where} writing {self.path}")
        return HypervisorError(f"writing {self.path} on {self.where}: {exc}")

    def write(self, offset: int, data: bytes) -> None:
        import nbd

        try:
            self._h.pwrite(data, offset)
        except nbd.Error as exc:
            raise self._fail(exc) from None

    def zero(self, offset: int, length: int) -> None:
        import nbd

        try:
            self._h.zero(length, offset)
        except nbd.Error as exc:
            raise self._fail(exc) from None

    def read(self, offset: int, length: int) -> bytes:
        import nbd

        try:
            return bytes(self._h.pread(length, offset))
        except nbd.Error as exc:
            raise HypervisorError(f"reading {self.path} on {self.where}: {exc}") from None

    def close(self, *, flush: bool = True) -> None:
        import nbd

        try:
            if flush:
                try:
                    self._h.flush()
                except nbd.Error as exc:
                    raise self._fail(exc) from None
            with contextlib.suppress(nbd.Error):
                self._h.shutdown()
        finally:
            self._stop()


class StreamWriter(DiskWriter):
    """A standby disk written through the framed stream (see :mod:`.replica_frames`)."""

    def __init__(self, sender: FrameSender, index: int, path: str, where: str) -> None:
        self.path, self.where = path, where
        self._sender, self._i = sender, index

    def write(self, offset: int, data: bytes) -> None:
        self._sender.data(self._i, offset, data)

    def zero(self, offset: int, length: int) -> None:
        self._sender.zero(self._i, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        raise HypervisorError(f"{self.path} on {self.where} is written, not read, here")

    def close(self, *, flush: bool = True) -> None:
        pass  # the stream ends once, for all its disks (Exports.close)


def check_dir(directory: str) -> str:
    """An absolute, plain standby directory (it goes into shell arguments, quoted)."""
    if not directory.startswith("/") or "\n" in directory or "/../" in directory + "/":
        raise UsageError(f"replica directory must be an absolute path: {directory!r}")
    return directory.rstrip("/") or "/"
