"""File-level restore: a snapshot's partitions, read-only, to list and copy files from.

``files ls/get`` serve the disk (``vmdr.serve``), expose it through nbdfuse, mount the
chosen partition in a private directory, do their work and tear everything down again.
``mount`` does the same but leaves the partition mounted at the user's mount point: a
forked background process (its own session) holds the repository lock, the NBD server
and nbdfuse until ``umount`` (or SIGTERM) ends it. See :mod:`vmdr.fileaccess`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from vmdr.errors import UsageError, VmdrError
from vmdr.fileaccess import (
    DiskFile,
    Partition,
    choose,
    copy_out,
    list_path,
    mount_partition,
    read_partitions,
)
from vmdr.fileaccess.diskfile import unmount_fuse
from vmdr.fileaccess.mounts import unmount
from vmdr.procutil import pid_alive
from vmdr.repository.manifest import DiskRecord, Snapshot
from vmdr.repository.repo import Repository

RUN_DIR = "/run/vmdr"
STATE_DIR = os.path.join(RUN_DIR, "mounts")


def _need_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("file-level restore mounts filesystems: run vmdr as root")


def pick_disk(snap: Snapshot, disk: str | None) -> DiskRecord:
    """The named disk, or the snapshot's first one."""
    if not snap.disks:
        raise UsageError(f"snapshot {snap.short_id} has no disks")
    if disk is None:
        return snap.disks[0]
    for d in snap.disks:
        if d.name == disk:
            return d
    names = ", ".join(d.name for d in snap.disks)
    raise UsageError(f"snapshot {snap.name}@{snap.short_id} has no disk {disk!r} "
                     f"(it has {names})")


def _workdir() -> str:
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    return tempfile.mkdtemp(prefix="vmdr-files-", dir=RUN_DIR)


def _remove_workdir(workdir: str) -> None:
    """Remove our private directory unless something is still mounted inside it."""
    for dirpath, dirs, _files in os.walk(workdir):
        for d in dirs:
            if os.path.ismount(os.path.join(dirpath, d)):
                return
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def disk_file(repo: Repository, snap: Snapshot, disk: DiskRecord,
              workdir: str) -> Iterator[str]:
    """The disk's bytes as a read-only file while the block runs."""
    from vmdr.serve import start_server

    server = start_server(repo, snap, disks=[disk.name])
    try:
        with DiskFile(server.exports[disk.name], workdir) as df:
            yield df.path
    finally:
        server.stop()


def list_partitions(repo: Repository, snap: Snapshot, disk: str | None) -> dict[str, Any]:
    _need_root()
    rec = pick_disk(snap, disk)
    workdir = _workdir()
    try:
        with disk_file(repo, snap, rec, workdir) as path:
            parts = read_partitions(path, rec.size)
    finally:
        _remove_workdir(workdir)
    return {"snapshot": snap.id, "disk": rec.name, "partitions": [p.as_dict() for p in parts]}


@contextlib.contextmanager
def mounted(repo: Repository, snap: Snapshot, disk: str | None,
            partition: int | None) -> Iterator[tuple[str, Partition, DiskRecord]]:
    """(mount point, partition, disk) of the chosen filesystem, mounted privately."""
    _need_root()
    rec = pick_disk(snap, disk)
    workdir = _workdir()
    try:
        with disk_file(repo, snap, rec, workdir) as path:
            part = choose(read_partitions(path, rec.size), partition, rec.name)
            mnt = os.path.join(workdir, "mnt")
            os.mkdir(mnt, 0o700)
            mount_partition(path, part, mnt)
            try:
                yield mnt, part, rec
            finally:
                unmount(mnt, lazy=True)
    finally:
        _remove_workdir(workdir)


def files_ls(repo: Repository, snap: Snapshot, disk: str | None, partition: int | None,
             path: str) -> dict[str, Any]:
    with mounted(repo, snap, disk, partition) as (root, part, rec):
        entries = list_path(root, path)
    return {"snapshot": snap.id, "disk": rec.name, "partition": part.number,
            "fstype": part.fstype, "path": path, "entries": entries}


def files_get(repo: Repository, snap: Snapshot, disk: str | None, partition: int | None,
              path: str, dest: str) -> dict[str, Any]:
    t0 = time.monotonic()
    with mounted(repo, snap, disk, partition) as (root, part, rec):
        written, files, total = copy_out(root, path, os.path.abspath(dest))
    return {"snapshot": snap.id, "disk": rec.name, "partition": part.number,
            "fstype": part.fstype, "path": path, "dest": written, "files": files,
            "bytes": total, "duration_s": round(time.monotonic() - t0, 3)}


# -- vmdr mount / umount ---------------------------------------------------------------------

def state_path(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(STATE_DIR, f"{key}.json")


def _read_state(mountpoint: str) -> dict[str, Any] | None:
    try:
        with open(state_path(mountpoint), encoding="utf-8") as f:
            doc: dict[str, Any] = json.load(f)
            return doc
    except (OSError, ValueError):
        return None




def mount_background(
    open_repo: Callable[[], Repository], snap_id: str, disk: str | None,
    partition: int | None, mountpoint: str,
) -> dict[str, Any]:
    """Fork a holder process that mounts the partition at ``mountpoint`` and stays until
    ``umount``; return once it is mounted (or raise its error)."""
    _need_root()
    mountpoint = os.path.realpath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"something is already mounted at {mountpoint}")
    st = _read_state(mountpoint)
    if st and pid_alive(int(st.get("pid", 0))):
        raise UsageError(f"vmdr already has a snapshot mounted at {mountpoint}")
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder
        os.close(rfd)
        code = 1
        try:
            os.setsid()
            code = _hold(open_repo, snap_id, disk, partition, mountpoint, wfd)
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "r", encoding="utf-8") as pipe:
        line = pipe.readline()
    try:
        reply = json.loads(line)
    except ValueError:
        os.waitpid(pid, 0)
        raise VmdrError("the mount helper died before mounting the snapshot") from None
    if "error" in reply:
        os.waitpid(pid, 0)
        exc = VmdrError(str(reply["error"]))
        exc.exit_code = int(reply.get("code", 1))
        raise exc
    return dict(reply)


def _send(fd: int, doc: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(doc) + "\n").encode())
        os.close(fd)


def _hold(open_repo: Callable[[], Repository], snap_id: str, disk: str | None,
          partition: int | None, mountpoint: str, wfd: int) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda _s, _f: stop.set())
    workdir = _workdir()
    cleanup = contextlib.ExitStack()
    try:
        with cleanup:
            cleanup.callback(_remove_workdir, workdir)
            repo = cleanup.enter_context(open_repo())
            cleanup.enter_context(repo.lock(exclusive=False, command="mount"))
            snap = repo.load_snapshot(snap_id)
            rec = pick_disk(snap, disk)
            path = cleanup.enter_context(disk_file(repo, snap, rec, workdir))
            part = choose(read_partitions(path, rec.size), partition, rec.name)
            mount_partition(path, part, mountpoint)
            cleanup.callback(unmount, mountpoint, lazy=True)
            state = {"pid": os.getpid(), "mountpoint": mountpoint, "snapshot": snap.id,
                     "name": snap.name, "disk": rec.name, "partition": part.number,
                     "fstype": part.fstype, "workdir": workdir}
            with open(state_path(mountpoint), "w", encoding="utf-8") as f:
                json.dump(state, f)
            cleanup.callback(_unlink, state_path(mountpoint))
            _send(wfd, state)
            _detach_stdio()
            while not stop.wait(1.0):
                pass
        return 0
    except VmdrError as exc:
        _send(wfd, {"error": exc.message, "code": exc.exit_code})
        return exc.exit_code
    except BaseException as exc:  # reported to the parent as one line
        _send(wfd, {"error": f"internal error: {type(exc).__name__}: {exc}", "code": 1})
        return 1


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def umount(mountpoint: str, timeout: float = 30.0) -> dict[str, Any]:
    """Unmount what ``mount`` mounted and end its holder process."""
    _need_root()
    mountpoint = os.path.realpath(mountpoint)
    st = _read_state(mountpoint)
    if st is None:
        raise UsageError(f"no vmdr mount at {mountpoint}")
    unmount(mountpoint)  # fails (busy) before anything else is torn down
    pid = int(st.get("pid", 0))
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    workdir = str(st.get("workdir", ""))
    if workdir.startswith(os.path.join(RUN_DIR, "vmdr-files-")) and os.path.isdir(workdir):
        unmount_fuse(os.path.join(workdir, "fuse"))  # the holder was killed (kill -9)
        _remove_workdir(workdir)
    _unlink(state_path(mountpoint))
    return {"mountpoint": mountpoint, "snapshot": st.get("snapshot"), "disk": st.get("disk")}
