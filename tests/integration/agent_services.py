"""Private PostgreSQL and etcd instances on loopback for the agent's fleet tests.

Each fixture starts its own daemons on free loopback ports, in a fresh directory, and stops
them by PID (SIGKILL for etcd members, which can hang on SIGTERM after losing quorum).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .vmtools import VMDR


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def postgres_url(postgres: tuple[str, str]) -> str:
    """The throwaway cluster's URL over TCP on 127.0.0.1."""
    return postgres[0]


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL cluster (trust auth): (URL over 127.0.0.1, URL over its unix
    socket in /tmp — reachable from the multi-host harness's host namespaces too)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or shutil.which("runuser") is None:
        pytest.skip("Debian postgresql is not installed")
    bindir = os.path.dirname(bins[-1])
    d = tempfile.mkdtemp(prefix="vmdr-pg-")
    os.chmod(d, 0o755)
    shutil.chown(d, "postgres", "postgres")
    data = os.path.join(d, "data")
    (port,) = free_ports(1)

    def as_pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                              text=True, timeout=120, cwd=d)

    p = as_pg(f"{bindir}/initdb", "-D", data, "--auth=trust", "-U", "postgres", "-E", "UTF8")
    assert p.returncode == 0, p.stderr
    p = as_pg(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(d, "log"), "-w", "-o",
              f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    with open(os.path.join(d, "log")) as f:
        assert p.returncode == 0, p.stderr + f.read()
    try:
        yield (f"postgresql://postgres@127.0.0.1:{port}/postgres",
               f"postgresql://postgres@/postgres?host={d}&port={port}")
    finally:
        as_pg(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(d, ignore_errors=True)


class Etcd:
    def __init__(self, n: int = 3) -> None:
        if shutil.which("etcd") is None:
            pytest.skip("Debian etcd-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="vmdr-etcd-")
        ports = free_ports(2 * n)
        self.client_ports, peer_ports = ports[:n], ports[n:]
        self.names = [f"m{i}" for i in range(n)]
        cluster = ",".join(f"{m}=http://127.0.0.1:{p}" for m, p in zip(self.names, peer_ports))
        self.procs: list[subprocess.Popen[bytes]] = []
        for m, cp, pp in zip(self.names, self.client_ports, peer_ports):
            log = open(os.path.join(self.dir, f"{m}.log"), "wb")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                ["etcd", "--name", m, "--data-dir", os.path.join(self.dir, m),
                 "--listen-client-urls", f"http://127.0.0.1:{cp}",
                 "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                 "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--initial-cluster-token", os.path.basename(self.dir), "--pre-vote",
                 "--heartbeat-interval", "100", "--election-timeout", "1000"],
                stdout=log, stderr=subprocess.STDOUT))
        self.endpoints = [f"http://127.0.0.1:{p}" for p in self.client_ports]
        deadline = time.monotonic() + 30
        for ep in self.endpoints:
            while True:
                try:
                    with urllib.request.urlopen(f"{ep}/health", timeout=2) as r:
                        if b'"true"' in r.read():
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "etcd did not become healthy"
                time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[Etcd]:
    """Three etcd members on loopback ports (a real raft cluster, no namespaces needed)."""
    e = Etcd(3)
    try:
        yield e
    finally:
        e.stop()


@contextmanager
def running_agent(env: dict[str, str], port: int, log_path: Path,
                  tries: int = 150) -> Iterator[str]:
    """``vmdr agent`` as a subprocess with *env* (its config in ``VMDR_CONFIG``), yielding
    its base URL once ``/api/v1/health`` answers; stopped (TERM, then KILL) on exit, the
    tail of its log printed for a failing test's report."""
    log = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen([*VMDR, "agent"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(tries):
            try:
                urllib.request.urlopen(f"{url}/api/v1/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(log_path.read_text()[-4000:])
