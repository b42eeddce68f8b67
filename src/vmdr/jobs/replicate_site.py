"""The DR host's side of a replica: the standby directory, its qcow2 disks, their restore
points (internal snapshots), the state file, and a writable NBD export of each disk.

The same small ``sh -c`` scripts run here (a local target: ``qemu:///system``) or on the
DR host over one compressed, key-authenticated OpenSSH control master (a ``qemu+ssh://``
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
import select
import shlex
import subprocess
import time
from dataclasses import replace
from typing import Any

from vmdr.errors import HypervisorError, NoSpace, UsageError, VmdrError
from vmdr.hypervisor import is_local_uri, parse_ssh_uri
from vmdr.hypervisor.remote import RemoteHost

_FREE = r"""mkdir -p -- "$1" || exit 3
df -P -B1 -- "$1" | awk 'NR==2 {print $4}'
"""
_READ = r"""[ -e "$1" ] || exit 3
cat -- "$1"
"""
_WRITE = r"""set -e
umask 077
cat > "$1.tmp"
sync "$1.tmp" 2>/dev/null || true
mv -f -- "$1.tmp" "$1"
"""
_CREATE = r"""[ -e "$1" ] && exit 0
qemu-img create -q -f qcow2 -o lazy_refcounts=off -- "$1" "$2"
"""
_SNAP_LIST = r"""qemu-img snapshot -l -U -- "$1" | awk 'NR>2 {print $2}'
"""
_SNAP = r"""img=$1; op=$2; shift 2
for tag in "$@"; do qemu-img snapshot "$op" "$tag" -- "$img" || exit 4; done
"""
_PINNED = r"""for f in "$1"/test-*/pin; do
  [ -e "$f" ] || continue
  flock -n -x "$f" true 2>/dev/null && continue
  cat -- "$f"; echo
done
exit 0
"""
_LIST_STATES = r"""for f in "$1"/*/replica.json; do [ -e "$f" ] && printf '%s\n' "$f"; done; exit 0
"""
_NBD = r"""img=$1 fmt=${2:-qcow2}
d=$(mktemp -d "${TMPDIR:-/tmp}/vmdr-rep.XXXXXX") || exit 3
sock=$d/nbd.sock
qemu-nbd --persistent --shared=2 --format="$fmt" --cache=writeback --aio=threads \
  --discard=unmap --socket="$sock" -- "$img" 2>"$d/err" &
p=$!
n=0
while [ ! -S "$sock" ]; do
  if ! kill -0 "$p" 2>/dev/null; then cat "$d/err" >&2; rm -rf -- "$d"; exit 4; fi
  n=$((n + 1)); [ "$n" -lt 600 ] || { kill "$p"; rm -rf -- "$d"; exit 5; }
  sleep 0.05
done
echo "ready $sock"
cat >/dev/null
kill "$p" 2>/dev/null
wait "$p"
rm -rf -- "$d"
"""


def _last_line(data: bytes | None) -> str:
    lines = [ln.strip() for ln in (data or b"").decode(errors="replace").splitlines()
             if ln.strip()]
    return lines[-1] if lines else "no error output"


class Site:
    """The DR host of one replica target URI (local or ``qemu+ssh://``)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.local = is_local_uri(uri)
        self._host: RemoteHost | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._forwards = 0
        if not self.local:
            target = parse_ssh_uri(uri)  # UsageError for tcp/tls: data must go over ssh
            self._host = RemoteHost(replace(target, compression=True))
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
        out = self.run(_PINNED, directory).stdout.decode().split()
        return {ln for ln in out if ln}

    def state_files(self, root: str) -> list[str]:
        return [ln for ln in self.run(_LIST_STATES, root).stdout.decode().splitlines() if ln]

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
            self._stop(proc)
            err = proc.stderr.read() if proc.stderr else b""
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


def check_dir(directory: str) -> str:
    """An absolute, plain standby directory (it goes into shell arguments, quoted)."""
    if not directory.startswith("/") or "\n" in directory or "/../" in directory + "/":
        raise UsageError(f"replica directory must be an absolute path: {directory!r}")
    return directory.rstrip("/") or "/"
