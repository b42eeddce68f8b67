"""The hypervisor host's files as a backup session and crash cleanup need them.

:class:`LocalFiles` is this machine (``qemu:///system``). :class:`RemoteFiles` is the host
of a ``qemu+ssh://`` URI, reached over one ssh control master (:mod:`.remote`): the work
directory, scratch files and ``state.json`` are created, read and removed *there*, NBD
sockets there are forwarded to a private directory here, and stopped domains' images are
exported there by a read-only ``qemu-nbd`` that lives exactly as long as its ssh channel.

Who owns a remote work directory (crash cleanup from any machine): a running session
holds a **lease**, ``flock <workdir>.lease`` held by a remote command over its ssh
connection; when vmdr dies (even ``kill -9``: the master has ``pdeathsig``) the
connection closes, the remote command exits and the lock is released. A state whose
lease is free is abandoned unless its pid is alive on *this* machine in the same boot
(``boot_id`` + pid + process start time), so a run from another machine is never
mistaken for dead just because its pid means nothing here. The lease file sits next to
the work directory and is never deleted (deleting a lock file would let two holders lock
two different inodes).
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from typing import Any

from vmdr.errors import RemoteFailed, VMLocked

from . import remote, state
from .domain import DiskInfo
from .nbd import BASE_ALLOCATION, NbdReader, Reader
from .remote import RemoteHost, SshTarget

LEASE_HELD = 75  # flock -E: lock held by someone else

# Each script runs as ``sh -c SCRIPT vmdr ARG...`` on the hypervisor host.
_PREPARE = r"""set -e
scratch=$1; work=$2; user=$3
mkdir -p -- "$scratch"
mkdir -p -m 0770 -- "$work"
if [ "$user" = auto ]; then
  user=
  for u in libvirt-qemu qemu; do
    if id -u "$u" >/dev/null 2>&1; then user=$u; break; fi
  done
fi
if [ -n "$user" ] && [ "$(id -u)" = 0 ]; then
  chown -- "$user:$(id -gn "$user")" "$work"
  chmod 0770 -- "$work"
  chmod o+x -- "$scratch"
  if command -v setpriv >/dev/null 2>&1 &&
     ! setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups test -w "$work"; then
    echo "QEMU runs as $user and cannot reach the scratch directory $work" >&2; exit 4
  fi
fi
"""
_WRITE = r"""set -e
umask 077
cat > "$1.tmp"
mv -f -- "$1.tmp" "$1"
"""
_READ = r"""[ -e "$1" ] || exit 3
cat -- "$1"
"""
_REMOVE = r"""w=$1
[ -d "$w" ] || exit 0
for f in "$w"/* "$w"/.[!.]*; do
  if [ -L "$f" ] || { [ -e "$f" ] && [ ! -d "$f" ]; }; then rm -f -- "$f" && printf '%s\n' "$f"; fi
done
rmdir -- "$w" 2>/dev/null || true
"""
_LEASE = r"""mkdir -p -- "$(dirname -- "$1")"
exec flock -n -E 75 -- "$1" sh -c 'echo locked; exec cat >/dev/null'
"""
_LEASE_TEST = r"""[ -e "$1" ] || exit 0
exec flock -n -E 75 -- "$1" true
"""
_TAR = r"""[ -d "$1" ] || exit 3
exec tar -C "$1" --format=pax -cf - .
"""
_QEMU_NBD = r"""sock=$1; fmt=$2; img=$3; bm=${4:-}
rm -f -- "$sock"
qemu-nbd --read-only --persistent --shared=16 --format="$fmt" --socket="$sock" \
  ${bm:+"--bitmap=$bm"} -- "$img" >/dev/null &
p=$!
n=0
while [ ! -S "$sock" ]; do
  kill -0 "$p" 2>/dev/null || { wait "$p"; exit 4; }
  n=$((n + 1)); [ "$n" -lt 600 ] || { kill "$p"; exit 5; }
  sleep 0.1
done
echo ready
cat >/dev/null
kill "$p" 2>/dev/null
wait "$p"
rm -f -- "$sock"
"""


def lease_path(workdir: str) -> str:
    """The lease file of a work directory (next to it, never deleted)."""
    return workdir.rstrip("/") + ".lease"


class LocalFiles:
    """The hypervisor is this machine: plain file operations."""

    remote: str | None = None
    local_dir: str | None = None
    ssh_pids: list[int] = []

    def open(self) -> LocalFiles:
        return self

    def close(self) -> None:
        pass

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def make_workdir(self, scratch_dir: str, uuid: str, user: str | None) -> str:
        os.makedirs(scratch_dir, exist_ok=True)
        return state.make_workdir(scratch_dir, uuid, user)

    def write_state(self, workdir: str, st: state.BackupState) -> None:
        state.write(workdir, st)

    def read_state(self, workdir: str) -> state.BackupState | None:
        return state.read(workdir)

    def remove_workdir(self, workdir: str) -> list[str]:
        return state.remove_workdir(workdir)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def acquire_lease(self, workdir: str, what: str) -> None:
        """Nothing to do locally: the VM lock (flock under /run/vmdr) excludes other runs."""

    def owner_alive(self, st: state.BackupState, workdir: str) -> bool:
        return state.owner_alive(st)

    def reap(self, st: state.BackupState) -> list[str]:
        return []

    def connectable(self, socket_path: str, name: str) -> str:
        return socket_path

    def command(self, argv: Sequence[str]) -> tuple[int, str, str]:
        p = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=600)
        return p.returncode, p.stdout, p.stderr

    def read_file(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_tree(self, path: str) -> bytes | None:
        if not os.path.isdir(path):
            return None
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(path, arcname=".")
        return buf.getvalue()


class RemoteFiles:
    """The hypervisor host of a ``qemu+ssh://`` URI, over one ssh control master."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.host = RemoteHost(target)
        self.remote: str | None = str(target)
        self._lease: subprocess.Popen[bytes] | None = None

    @property
    def local_dir(self) -> str | None:
        return self.host.dir

    @property
    def ssh_pids(self) -> list[int]:
        return self.host.pids

    def open(self) -> RemoteFiles:
        self.host.open()
        return self

    def close(self) -> None:
        """Release the lease, stop the ssh processes, remove the private directory."""
        self._lease = None
        self.host.close()

    def realpath(self, path: str) -> str:
        return posixpath.normpath(path)

    def make_workdir(self, scratch_dir: str, uuid: str, user: str | None) -> str:
        work = state.workdir_for(scratch_dir, uuid)
        self.host.run(_PREPARE, scratch_dir, work, user or "")
        return work

    def write_state(self, workdir: str, st: state.BackupState) -> None:
        st.remote, st.local_dir, st.ssh_pids = self.remote, self.local_dir, self.ssh_pids
        self.host.run(_WRITE, posixpath.join(workdir, state.STATE_FILE), input=state.dumps(st))

    def read_state(self, workdir: str) -> state.BackupState | None:
        p = self.host.run(_READ, posixpath.join(workdir, state.STATE_FILE), ok=(0, 3))
        return state.loads(p.stdout) if p.returncode == 0 else None

    def remove_workdir(self, workdir: str) -> list[str]:
        out = self.host.run(_REMOVE, workdir).stdout.decode(errors="replace")
        return [ln for ln in out.splitlines() if ln]

    def exists(self, path: str) -> bool:
        return self.host.run('[ -e "$1" ]', path, ok=(0, 1)).returncode == 0

    def unlink(self, path: str) -> None:
        self.host.run('rm -f -- "$1"', path)

    def acquire_lease(self, workdir: str, what: str) -> None:
        """Hold the work directory's lease until :meth:`close` (VMLocked if held)."""
        if self._lease is not None:
            return
        try:
            self._lease = self.host.spawn(_LEASE, lease_path(workdir), ready="locked")
        except RemoteFailed as exc:
            if exc.returncode == LEASE_HELD:
                raise VMLocked(f"{what}: another vmdr run holds {lease_path(workdir)} on "
                               f"{self.target.host}") from None
            raise

    def lease_held(self, workdir: str) -> bool:
        """True if a live session (of any machine) holds the work directory's lease."""
        if self._lease is not None:
            return False  # we hold it ourselves
        rc = self.host.run(_LEASE_TEST, lease_path(workdir), ok=(0, LEASE_HELD)).returncode
        return rc == LEASE_HELD

    def owner_alive(self, st: state.BackupState, workdir: str) -> bool:
        return self.lease_held(workdir) or state.owner_alive(st)

    def reap(self, st: state.BackupState) -> list[str]:
        """Local leftovers of a dead run from this machine: its ssh processes (if they
        survived it) and its private directory."""
        if not state.same_machine(st) or not st.local_dir:
            return []
        done = []
        d = st.local_dir
        if remote.reap(list(st.ssh_pids), d):
            done.append("stopped its leftover ssh forwarding")
        if os.path.basename(d).startswith("vmdr-ssh-") and os.path.isdir(d) \
                and os.stat(d).st_uid == os.geteuid():
            shutil.rmtree(d, ignore_errors=True)
        return done

    def connectable(self, socket_path: str, name: str) -> str:
        return self.host.forward(name, socket_path)

    def image_reader(self, d: DiskInfo, workdir: str, bitmap: str | None = None) -> Reader:
        """A stopped domain's image through a remote read-only qemu-nbd (QEMU's locks);
        with ``bitmap``, only what that qcow2 dirty bitmap marks."""
        assert d.source is not None
        sock = posixpath.join(workdir, f"{d.target}.nbd")
        proc = self.host.spawn(_QEMU_NBD, sock, d.format or "raw", d.source, bitmap or "",
                               ready="ready")
        try:
            local = self.host.forward(f"{d.target}.sock", sock)

            def connect(h: Any) -> None:
                h.connect_unix(local)

            ctx = f"qemu:dirty-bitmap:{bitmap}" if bitmap else BASE_ALLOCATION
            reader = NbdReader(connect, ctx, label=d.target)
        except BaseException:
            self.host.release(proc)
            raise
        return _ProcReader(reader, lambda: self.host.release(proc))

    def command(self, argv: Sequence[str]) -> tuple[int, str, str]:
        p = self.host.run('exec "$@"', *argv, ok=tuple(range(255)))
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")

    def read_file(self, path: str) -> bytes | None:
        p = self.host.run(_READ, path, ok=(0, 3))
        return p.stdout if p.returncode == 0 else None

    def read_tree(self, path: str) -> bytes | None:
        p = self.host.run(_TAR, path, ok=(0, 3))
        return p.stdout if p.returncode == 0 else None


class _ProcReader:
    """An NBD reader whose server process ends when the reader is closed."""

    def __init__(self, reader: NbdReader, stop: Any) -> None:
        self._reader = reader
        self._stop = stop
        self.size = reader.size
        self.extents = reader.extents
        self.read = reader.read

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self._stop()


HostFiles = LocalFiles | RemoteFiles
