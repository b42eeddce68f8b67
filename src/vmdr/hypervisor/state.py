"""The state file a backup writes in its work directory, so the next run can clean up."""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
from dataclasses import asdict, dataclass, field

from vmdr.errors import UsageError
from vmdr.procutil import proc_start_time

STATE_FILE = "state.json"


@dataclass
class BackupState:
    """What a running backup has put in place (updated as it goes)."""

    domain: str
    uuid: str
    prefix: str
    method: str
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    boot_id: str | None = field(default_factory=lambda: boot_id())
    pid_start: str | None = field(default_factory=lambda: proc_start_time(os.getpid()))
    checkpoint: str | None = None
    committed: bool = False
    socket: str | None = None
    overlays: dict[str, list[str]] = field(default_factory=dict)  # target -> [overlay, path, fmt]
    started: str = ""
    remote: str | None = None  # ssh login (user@host:port) when the hypervisor is remote
    local_dir: str | None = None  # private dir of the ssh control socket and forwards
    ssh_pids: list[int] = field(default_factory=list)  # local ssh processes (crash cleanup)


def boot_id() -> str | None:
    """This machine's current boot (a pid means nothing on another machine or boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None




def same_machine(state: BackupState) -> bool:
    """True if ``state`` was written on this machine during this boot."""
    if state.boot_id is not None:
        mine = boot_id()
        if mine is not None:
            return mine == state.boot_id and state.host == socket.gethostname()
    return state.host == socket.gethostname()


def workdir_for(scratch_dir: str, uuid: str) -> str:
    """The per-domain work directory inside ``scratch_dir``: 12 hex digits of the domain
    UUID, short because the NBD unix socket path lives there (108 bytes at most)."""
    return os.path.join(scratch_dir, uuid.replace("-", "")[:12])


def qemu_user() -> str | None:
    """The account QEMU runs as under qemu:///system (Debian: libvirt-qemu, Fedora: qemu)."""
    for name in ("libvirt-qemu", "qemu"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def blocking_ancestor(path: str, user: str) -> str | None:
    """The first directory above ``path`` that ``user`` cannot traverse, or None."""
    pw = pwd.getpwnam(user)
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    current = os.path.abspath(path)
    chain = []
    while True:
        chain.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for d in reversed(chain[1:]):
        st = os.stat(d)
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return d
    return None


def require_reachable(directory: str, user: str) -> None:
    """Raise ``UsageError`` unless *user* (QEMU's) can traverse down to *directory*."""
    blocked = blocking_ancestor(directory, user)
    if blocked is not None:
        raise UsageError(f"QEMU runs as {user} and cannot reach {directory}: {blocked} is "
                         "not searchable for it")


def make_workdir(scratch_dir: str, uuid: str, user: str | None) -> str:
    """Create the work directory; QEMU (running as ``user``) must create sockets there."""
    path = workdir_for(scratch_dir, uuid)
    os.makedirs(path, mode=0o770, exist_ok=True)
    if user and os.geteuid() == 0:
        require_reachable(scratch_dir, user)
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o770)  # noqa: S103 - QEMU's group creates the NBD socket here
        mode = os.stat(scratch_dir).st_mode
        if not mode & 0o001:  # QEMU must be able to traverse the scratch directory
            os.chmod(scratch_dir, (mode & 0o7777) | 0o711)  # noqa: S103 - search only
    return path


def dumps(state: BackupState) -> bytes:
    """The state file's bytes."""
    return json.dumps(asdict(state), indent=1).encode()


def loads(data: bytes | str) -> BackupState | None:
    """Parse a state file (None if it is not one)."""
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    known = {k: v for k, v in raw.items() if k in BackupState.__dataclass_fields__}
    try:
        return BackupState(**known)
    except TypeError:
        return None


def write(workdir: str, state: BackupState) -> None:
    """Atomically write the state file."""
    tmp = os.path.join(workdir, STATE_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(dumps(state))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(workdir, STATE_FILE))


def read(workdir: str) -> BackupState | None:
    """The state file of an unfinished backup, or None."""
    try:
        with open(os.path.join(workdir, STATE_FILE), "rb") as f:
            return loads(f.read())
    except OSError:
        return None


def owner_alive(state: BackupState) -> bool:
    """True if the process that wrote ``state`` still runs on this machine (and is not us).

    A state from another machine (or an earlier boot) counts as dead here: local
    workdirs are only written by local runs. Remote hypervisors add a lease on the
    hypervisor host (see :mod:`.hostfiles`), which is what other machines go by.
    """
    if not same_machine(state) or state.pid == os.getpid():
        return False
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if state.pid_start is not None:
        return proc_start_time(state.pid) in (state.pid_start, None)
    return True


def remove_workdir(workdir: str) -> list[str]:
    """Delete the work directory's files (scratch, sockets, state); the paths removed."""
    removed: list[str] = []
    if not os.path.isdir(workdir):
        return removed
    for name in sorted(os.listdir(workdir)):
        p = os.path.join(workdir, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                continue
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(workdir)
    except OSError:
        pass
    return removed
