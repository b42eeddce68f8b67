"""A three-member etcd cluster (Debian etcd-server 3.4) on the test bridge, each member in
its own network namespace so that killing a libvirt host never costs quorum.

Members run with ``--pre-vote`` (a rejoining partitioned member must not bump the raft
term) and are stopped with SIGKILL (members that lost quorum can hang on SIGTERM).
Clients: :meth:`EtcdCluster.ctl` runs ``etcdctl`` inside a namespace (a host's, or the first
member's); :meth:`EtcdCluster.root_endpoints` gives URLs for root-namespace clients (aetcd,
etcd3gw) after the route guard has proved they go through the test bridge.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

from tests.multihost.net import Node, TestNet, kill_netns, run

if TYPE_CHECKING:
    from tests.multihost.hosts import Host

__all__ = ["EtcdCluster"]

FIRST_OCTET = 101  # members are .101, .102, .103


class EtcdCluster:
    def __init__(self, net: TestNet, size: int = 3) -> None:
        self.net = net
        self.size = size
        self.nodes: list[Node] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dir = net.dir / "etcd"

    @property
    def endpoints(self) -> list[str]:
        """Client URLs, for clients inside the test network (host namespaces)."""
        return [f"http://{n.addr}:2379" for n in self.nodes]

    def live_endpoints(self) -> list[str]:
        """Client URLs of the members whose process runs (not a client's view of health)."""
        return [f"http://{n.addr}:2379" for n in self.nodes if self.member_alive(n.name)]

    def root_endpoints(self) -> list[str]:
        """Client URLs for root-namespace clients: each address is checked by the route
        guard first (raises UnsafeTestRoute without a root leg on the bridge)."""
        return [f"http://{self.net.root_addr(n.addr)}:2379" for n in self.nodes]

    def _initial_cluster(self) -> str:
        return ",".join(f"{n.name}=http://{n.addr}:2380" for n in self.nodes)

    def up(self, timeout: float = 30.0) -> EtcdCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            self.nodes.append(self.net.add_node(f"e{i + 1}", FIRST_OCTET + i))
        for node in self.nodes:
            self.start_member(node.name, new=True)
        self.wait_healthy(timeout)
        return self

    def start_member(self, name: str, *, new: bool = False) -> None:
        node = next(n for n in self.nodes if n.name == name)
        data = self.dir / f"{name}.data"
        if new:
            shutil.rmtree(data, ignore_errors=True)
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", node.ns, "etcd", "--name", name,
                 "--data-dir", str(data),
                 "--listen-peer-urls", f"http://{node.addr}:2380",
                 "--initial-advertise-peer-urls", f"http://{node.addr}:2380",
                 "--listen-client-urls", f"http://{node.addr}:2379,http://127.0.0.1:2379",
                 "--advertise-client-urls", f"http://{node.addr}:2379",
                 "--initial-cluster", self._initial_cluster(),
                 "--initial-cluster-token", self.net.prefix,
                 "--initial-cluster-state", "new",
                 "--pre-vote", "--logger", "zap", "--log-outputs", "stderr"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()

    def kill_member(self, name: str) -> None:
        node = next(n for n in self.nodes if n.name == name)
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
        kill_netns(node.ns)

    def member_alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def down(self) -> None:
        for node in self.nodes:
            try:
                self.kill_member(node.name)
            except Exception:
                pass

    # -- clients ----------------------------------------------------------------------------
    def ctl(self, *args: str, host: Host | None = None, check: bool = True,
            endpoints: list[str] | None = None,
            timeout: float = 15) -> subprocess.CompletedProcess[str]:
        """``etcdctl`` with ``endpoints`` (default: every member), run inside ``host``
        (default: the namespace of the first live member)."""
        eps = ",".join(endpoints or self.endpoints)
        cmd = ["etcdctl", "--endpoints", eps, "--command-timeout=5s", *args]
        if host is not None:
            return host.run(*cmd, check=check, timeout=timeout)
        node = next((n for n in self.nodes if self.member_alive(n.name)), self.nodes[0])
        return run("ip", "netns", "exec", node.ns, *cmd, check=check, timeout=timeout)

    def popen_ctl(self, host: Host, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """A long-running etcdctl (watch, lease keep-alive) inside ``host``."""
        return host.popen("etcdctl", "--endpoints", ",".join(self.endpoints), *args, **kw)

    def healthy_members(self) -> int:
        p = self.ctl("endpoint", "health", check=False)
        return (p.stdout + p.stderr).count("is healthy")

    def wait_healthy(self, timeout: float = 30.0, members: int | None = None) -> None:
        want = self.size if members is None else members
        deadline = time.monotonic() + timeout
        while self.healthy_members() < want:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"etcd {name} exited: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy: {self.log_tail(self.nodes[0].name)}")
            time.sleep(0.1)

    def log_tail(self, name: str) -> str:
        """The member's fatal/panic message if it logged one, else the log's tail."""
        try:
            text = (self.dir / f"{name}.log").read_text()
        except OSError:
            return ""
        for line in text.splitlines():
            if '"level":"panic"' in line or '"level":"fatal"' in line:
                return line[:1500]
        return text[-1500:]
