"""Start and stop nbdkit processes that serve a snapshot's disks (see the package docstring)."""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from vmdr.errors import ServeError, UsageError
from vmdr.procutil import Pinned, proc_start_time, same_process
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository
from vmdr.storage.base import Backend
from vmdr.storage.file import FileBackend

log = logging.getLogger(__name__)
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin.py")
RUN_DIR = "/run/vmdr"
START_TIMEOUT = 60.0
OWNER_FILE = "owner.json"


class NbdServer:
    """Running NBD exports of one snapshot; a context manager. :meth:`stop` ends them all."""

    def __init__(self, snapshot: Snapshot, socket_dir: str | None, own_socket_dir: bool,
                 private_dir: str) -> None:
        self.snapshot = snapshot
        self.exports: dict[str, str] = {}  # disk -> NBD URI
        self.sockets: dict[str, str] = {}  # disk -> unix socket path (unix mode only)
        self.pids: dict[str, int] = {}  # disk -> nbdkit pid
        self.socket_dir = socket_dir
        self.private_dir = private_dir  # pid files and nbdkit logs (never key material)
        self._own_socket_dir = own_socket_dir
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stopped = False

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def alive(self) -> bool:
        """True while every nbdkit process runs."""
        return bool(self.pids) and all(is_nbdkit(p) for p in self.pids.values())

    def clients(self, disk: str) -> int:
        """Client connections *disk*'s nbdkit holds open now (the plugin notes each)."""
        try:
            marks = Path(self.private_dir, f"{disk}.clients").read_bytes()
        except FileNotFoundError:
            return 0
        return marks.count(b"+") - marks.count(b"-")

    def _daemons(self) -> list[int]:
        """Detached nbdkit processes (not our children) still running."""
        mine = {p.pid for p in self._procs.values()}
        return [p for p in self.pids.values() if p not in mine and is_nbdkit(p)]

    def stop(self) -> None:
        """Stop every nbdkit process and remove sockets and private files (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for pid in self._daemons():
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        while self._daemons() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._daemons():
            os.kill(pid, signal.SIGKILL)
        for path in self.sockets.values():
            _unlink(path)
        shutil.rmtree(self.private_dir, ignore_errors=True)
        if self._own_socket_dir and self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def start_server(
    repo: Repository, snap: Snapshot, *, disks: list[str] | None = None,
    socket_dir: str | None = None, port: int | None = None,
    socket_owner: str | None = None, listen: str = "127.0.0.1", detach: bool = False,
    socket_path: str | None = None,
    cache_chunks: int = 24, readahead: int = 6, workers: int = 4,
) -> NbdServer:
    """Serve *snap*'s disks (all, or *disks*) read-only over NBD; one nbdkit per disk.

    Unix sockets ``<socket_dir>/<disk>.sock`` by default (a private directory under
    /run/vmdr, or the temp dir when not root, is made and removed again), or TCP ports
    ``port``, ``port+1``… on *listen* (no TLS, no authentication: keep it on loopback or
    a trusted network). ``socket_owner`` (e.g. ``libvirt-qemu``) gets the sockets (and a
    directory we made). The servers die with this process unless ``detach``.
    ``socket_path`` names the socket of a single served disk instead.
    """
    chosen = _choose_disks(snap, disks)
    if socket_path is not None:
        if len(chosen) != 1 or socket_dir is not None:
            raise UsageError("a socket path serves one disk: pick it with --disk")
        socket_dir = os.path.dirname(os.path.abspath(socket_path))
    if port is not None and socket_dir is not None:
        raise UsageError("serve on unix sockets or on a TCP port, not both")
    if port is not None and not 0 < port + len(chosen) - 1 < 65536:
        raise UsageError(f"invalid port {port}")
    owner = _owner_ids(socket_owner) if socket_owner else None
    _check_nbdkit()
    url = repo_url(repo.backend)
    base = RUN_DIR if os.geteuid() == 0 else None
    if base:
        os.makedirs(base, mode=0o755, exist_ok=True)
    sweep_stale(base or tempfile.gettempdir())
    private = tempfile.mkdtemp(prefix="vmdr-serve-", dir=base)
    own_dir = port is None and socket_dir is None
    if port is None:
        if socket_dir is None:
            socket_dir = tempfile.mkdtemp(prefix="serve-", dir=base)
            if owner:
                os.chown(socket_dir, *owner)
        else:
            os.makedirs(socket_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(private, OWNER_FILE), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "start": proc_start_time(os.getpid()),
                   "socket_dir": socket_dir if own_dir else None}, f)
    server = NbdServer(snap, socket_dir if port is None else None, own_dir, private)
    try:
        if port is None:  # a dead run's nbdkit on our sockets: killed, its files removed
            assert socket_dir is not None
            reap_orphans([os.path.abspath(socket_path) if socket_path else
                          os.path.join(socket_dir, f"{name}.sock") for name in chosen])
        for i, name in enumerate(chosen):
            setup = {
                "url": url, "keyfile": base64.b64encode(repo.export_key()).decode()
                if repo.key is not None else None, "snapshot": snap.id, "disk": name,
                "cache_chunks": cache_chunks, "readahead": readahead, "workers": workers,
                "sys_path": [p for p in sys.path if p and os.path.isabs(p)],
            }
            setup_path = os.path.join(private, f"{name}.json")
            fd = os.open(setup_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(setup, f)
            del setup
            argv = ["nbdkit", "-r", "--pidfile", os.path.join(private, f"{name}.pid")]
            # nbdkit -f always dies with its parent (PR_SET_PDEATHSIG); detached ones fork
            argv += ["--log=stderr"] if detach else ["-f", "--exit-with-parent"]
            if port is None:
                assert socket_dir is not None
                sock = os.path.abspath(socket_path) if socket_path else \
                    os.path.join(socket_dir, f"{name}.sock")
                _unlink(sock)
                argv += ["-U", sock]
                server.sockets[name] = sock
                server.exports[name] = f"nbd+unix:///{name}?socket={sock}"
            else:
                argv += ["-i", listen, "-p", str(port + i)]
                host = f"[{listen}]" if ":" in listen else listen
                server.exports[name] = f"nbd://{host}:{port + i}/{name}"
            argv += ["python", PLUGIN, f"setup={setup_path}"]
            logf = open(os.path.join(private, f"{name}.log"), "wb")  # noqa: SIM115
            try:
                proc = _spawn(argv, logf, detach)
            finally:
                logf.close()
            server._procs[name] = proc
            server.pids[name] = proc.pid
        for name, proc in server._procs.items():
            pid = _wait_ready(name, proc, private, server.sockets.get(name), detach)
            server.pids[name] = pid
            if name in server.sockets:
                os.chmod(server.sockets[name], 0o660 if owner else 0o600)
                if owner:
                    os.chown(server.sockets[name], *owner)
    except BaseException:
        server.stop()
        raise
    return server


def sweep_stale(base: str) -> list[str]:
    """Remove private and socket directories of servers whose vmdr died (kill -9) and
    whose nbdkit processes are gone too (detached servers are left alone)."""
    removed: list[str] = []
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = os.path.join(base, entry)
        if not entry.startswith("vmdr-serve-"):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE), encoding="utf-8") as f:
                owner = json.load(f)
            pids = [int(Path(path, p).read_text("ascii").strip() or 0)
                    for p in os.listdir(path) if p.endswith(".pid")]
        except (OSError, ValueError):
            continue
        if _owner_alive(owner) or any(is_nbdkit(p) for p in pids if p):
            continue
        sock_dir = owner.get("socket_dir")
        if isinstance(sock_dir, str) and os.path.basename(sock_dir).startswith("serve-"):
            shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def reap_orphans(sockets: Sequence[str], timeout: float = 10.0) -> list[int]:
    """Kill (SIGKILL) the nbdkit processes of a dead vmdr that still serve one of the unix
    *sockets* we are about to take over, and remove their private directories; their pids.

    An nbdkit whose vmdr was killed (``kill -9``) got SIGTERM from ``--exit-with-parent``,
    but a quitting nbdkit keeps each client connection open and answers every request
    on it with ``ESHUTDOWN`` until each of its worker threads (16) has answered one. QEMU's
    NBD client takes that for an error of the request, not of the connection, so it stays
    on the dying server (and never reconnects to ours) until the guest or a block job has
    spent 16 requests — a disk the guest seldom reads can fail every copy for minutes. A
    killed process closes its connections at once, and QEMU's client reconnects.
    A server whose vmdr still runs is somebody else's: ServeError.

    Each process is pinned (:class:`vmdr.procutil.Pinned`) *before* its command line is
    read, so the kill reaches exactly the nbdkit that was checked, never a process that
    reused its pid; the owning vmdr is alive only if its recorded start time matches."""
    wanted = {os.path.abspath(s) for s in sockets}
    found: list[tuple[Pinned, str]] = []
    try:
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            proc = Pinned(pid)
            argv = _cmdline(pid)
            sock = _served_socket(argv)
            if sock is None or sock not in wanted or not proc.alive():
                proc.close()
                continue
            private = _private_dir(argv)
            owner = _read_owner(private) if private else {}
            if int(owner.get("pid", 0)) != os.getpid() and _owner_alive(owner):
                proc.close()
                raise ServeError(f"{sock} is being served by vmdr (pid {owner['pid']})")
            found.append((proc, private or ""))
        for proc, _ in found:
            log.warning("killing nbdkit %d left by a dead vmdr", proc.pid)
            proc.signal(signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(p.alive() for p, _ in found) and time.monotonic() < deadline:
            time.sleep(0.05)
        for private in {d for p, d in found if d and not p.alive()}:
            _remove_private(private)
        return [p.pid for p, _ in found]
    finally:
        for proc, _ in found:
            proc.close()


def _served_socket(argv: list[str]) -> str | None:
    """The unix socket an nbdkit of our plugin serves (from its command line), else None."""
    if not (argv and argv[0].endswith("nbdkit") and PLUGIN in argv and "-U" in argv):
        return None
    i = argv.index("-U")
    return os.path.abspath(argv[i + 1]) if i + 1 < len(argv) else None


def _private_dir(argv: list[str]) -> str | None:
    """The private directory of the vmdr that started the nbdkit of *argv* (its pid file's)."""
    if "--pidfile" not in argv or argv.index("--pidfile") + 1 >= len(argv):
        return None
    return os.path.dirname(argv[argv.index("--pidfile") + 1])


def _read_owner(private: str) -> dict[str, Any]:
    try:
        with open(os.path.join(private, OWNER_FILE), encoding="utf-8") as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the vmdr an owner record names still runs (not a process reusing its pid)."""
    try:
        pid = int(owner.get("pid", 0))
    except (TypeError, ValueError):
        return False
    start = owner.get("start")
    return same_process(pid, start if isinstance(start, str) else None)


def _remove_private(private: str) -> None:
    """A dead server's private directory, and the socket directory it made (``serve-*``)."""
    if not os.path.basename(private).startswith("vmdr-serve-"):
        return
    sock_dir = _read_owner(private).get("socket_dir")
    if isinstance(sock_dir, str) and os.path.basename(sock_dir).startswith("serve-"):
        shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(private, ignore_errors=True)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_nbdkit(pid: int) -> bool:
    """True if *pid* is a running (not zombie) nbdkit serving our plugin."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"nbdkit") and PLUGIN.encode() in argv




def repo_url(backend: Backend) -> str:
    """Where *backend* lives (unredacted: never print it); the plugin reopens it there."""
    b: Any = backend
    while True:
        if getattr(b, "source_url", ""):
            return str(b.source_url)
        if isinstance(b, FileBackend):
            return b.root
        if not hasattr(b, "inner"):
            raise UsageError(f"cannot serve from {backend.display_url}: its location is "
                             "unknown (open it through vmdr.storage.registry.open_backend)")
        b = b.inner


def _choose_disks(snap: Snapshot, disks: Sequence[str] | None) -> list[str]:
    names = [d.name for d in snap.disks]
    if not names:
        raise UsageError(f"snapshot {snap.short_id} has no disks")
    if not disks:
        return names
    for d in disks:
        if d not in names:
            raise UsageError(f"snapshot {snap.name}@{snap.short_id} has no disk {d!r} "
                             f"(it has {', '.join(names)})")
    return list(dict.fromkeys(disks))


def _owner_ids(user: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"no such user {user!r} (socket owner)") from None
    return pw.pw_uid, pw.pw_gid


@functools.cache
def _nbdkit_python() -> str | None:
    try:
        out = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
    except FileNotFoundError:
        raise ServeError("nbdkit is not installed (Debian: apt install nbdkit "
                         "nbdkit-plugin-python)") from None
    for line in out.splitlines():
        if line.startswith("python_version="):
            return line.split("=", 1)[1]
    raise ServeError("nbdkit has no Python plugin (Debian: apt install nbdkit-plugin-python)")


def _check_nbdkit() -> None:
    ver = _nbdkit_python() or ""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ver.split(".")[:2] != mine.split("."):
        raise ServeError(f"nbdkit embeds Python {ver} but vmdr runs on Python {mine}; "
                         "run vmdr with the system Python")


# The plugin opens the repository with the key in its private setup file; it needs no
# passphrase, so none is handed down (nbdkit, and anything it runs, would inherit it).
_WITHHELD = ("VMDR_PASSWORD", "VMDR_PASSWORD_FILE", "VMDR_KEY_FILE", "VMDR_NEW_PASSWORD",
             "VMDR_NEW_PASSWORD_FILE")


def child_env() -> dict[str, str]:
    """The environment for nbdkit: ours without any vmdr passphrase or key setting."""
    return {k: v for k, v in os.environ.items() if k not in _WITHHELD}


def _spawn(argv: list[str], logf: IO[bytes], detach: bool) -> subprocess.Popen[bytes]:
    """Start nbdkit. ``--exit-with-parent`` tracks the *thread* that forked it, so the
    fork happens in a keeper thread that lives exactly as long as nbdkit does."""
    kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": logf, "stderr": logf,
                          "close_fds": True, "umask": 0o077, "env": child_env()}
    if detach:
        return subprocess.Popen(argv, start_new_session=True, **kw)
    box: dict[str, Any] = {}
    started = threading.Event()

    def keeper() -> None:
        try:
            box["proc"] = proc = subprocess.Popen(argv, **kw)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc
            started.set()
            return
        started.set()
        proc.wait()

    threading.Thread(target=keeper, name="vmdr-nbdkit-keeper", daemon=True).start()
    started.wait()
    if "error" in box:
        raise ServeError(f"cannot start nbdkit: {box['error']}")
    proc: subprocess.Popen[bytes] = box["proc"]
    return proc


def _wait_ready(name: str, proc: subprocess.Popen[bytes], private: str, sock: str | None,
                detach: bool) -> int:
    """Wait until nbdkit listens; its pid (a detached nbdkit forks: the daemon's pid)."""
    pidfile = os.path.join(private, f"{name}.pid")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None and (rc != 0 or not detach):
            raise ServeError(f"NBD server for disk {name} failed: {_last_error(private, name)}")
        try:
            pid = int(Path(pidfile).read_text("ascii").strip() or 0)
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid and (sock is None or os.path.exists(sock)):
            return pid
        time.sleep(0.05)
    raise ServeError(f"NBD server for disk {name} did not start within {START_TIMEOUT:.0f}s")


def _last_error(private: str, name: str) -> str:
    try:
        with open(os.path.join(private, f"{name}.log"), encoding="utf-8",
                  errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except FileNotFoundError:
        return "no output"
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln.rsplit("error: ", 1)[-1][:300]
    return lines[-1][:300] if lines else "no output"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
