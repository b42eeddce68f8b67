"""The test network: a switch namespace with a bridge, nodes on it, an optional root leg,
and a registry of what each run created so a later run can sweep leftovers.

Names: every namespace of a run is ``vmdrmh<pid>-<role>`` and the root leg is
``vmdrmh<pid>``, with ``<pid>`` the creating process. ``sweep_stale()`` removes the
namespaces, processes, legs and directories of runs whose creator is gone.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.multihost.netguard import require_test_route
from vmdr.procutil import pid_alive, proc_start_time

__all__ = ["Node", "TestNet", "kill_netns", "run", "sweep_stale"]

PREFIX = "vmdrmh"
REGISTRY = Path("/run/vmdr-multihost")
BASE = Path("/var/tmp/vmdr-multihost")
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)(?:n\d+)?(?:-|$)")
_runs = itertools.count()


def _new_prefix() -> str:
    """``vmdrmh<pid>``, then ``vmdrmh<pid>n1``... for further networks of one process
    (the root leg carries the prefix as its name: at most 15 characters)."""
    n = next(_runs)
    return f"{PREFIX}{os.getpid()}" + (f"n{n}" if n else "")


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def netns_pids(ns: str) -> list[int]:
    p = run("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def kill_netns(ns: str, *, timeout: float = 5.0) -> None:
    """SIGKILL every process in namespace ``ns`` and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {ns} survive SIGKILL: {pids}")
        time.sleep(0.05)


def _delete_netns(ns: str) -> None:
    try:
        kill_netns(ns)
    finally:
        run("ip", "netns", "del", ns, check=False)


@dataclass
class Node:
    """One namespace on the bridge: ``eth0`` in ``ns``, its peer ``port`` in the switch."""

    name: str
    ns: str
    addr: str
    port: str


@dataclass
class TestNet:
    """A bridge ``br0`` in namespace ``<prefix>-sw`` on subnet 10.77.<k>.0/24.

    With ``root_leg=True`` the root namespace gets a veth (named like the prefix) into the
    bridge with address .254, so root-namespace clients can reach test addresses; every
    such use goes through :meth:`root_addr`, which enforces the route guard.
    """

    __test__ = False

    root_leg: bool = True
    prefix: str = field(default_factory=_new_prefix)
    octet: int = 0
    nodes: dict[str, Node] = field(default_factory=dict)
    leg: str | None = None
    base: Path = BASE
    _up: bool = False

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def subnet(self) -> str:
        return f"10.77.{self.octet}.0/24"

    def address(self, host: int) -> str:
        return f"10.77.{self.octet}.{host}"

    @property
    def dir(self) -> Path:
        return self.base / self.prefix

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self) -> TestNet:
        sweep_stale()
        self.octet = _free_octet()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.dir, 0o755)
        self._up = True
        self._save()
        run("ip", "netns", "add", self.switch)
        self._save()
        sw = self.switch
        run("ip", "-n", sw, "link", "set", "lo", "up")
        run("ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0",
            "forward_delay", "0")
        run("ip", "-n", sw, "link", "set", "br0", "up")
        if self.root_leg:
            leg = self.prefix
            run("ip", "link", "add", leg, "type", "veth", "peer", "name", "root", "netns", sw)
            self.leg = leg
            self._save()
            run("ip", "-n", sw, "link", "set", "root", "master", "br0", "up")
            run("ip", "addr", "add", f"{self.address(254)}/24", "dev", leg)
            run("ip", "link", "set", leg, "up")
        return self

    def add_node(self, name: str, host: int) -> Node:
        """A new namespace ``<prefix>-<name>`` with eth0 = 10.77.<k>.<host> on the bridge."""
        ns, port = f"{self.prefix}-{name}", name
        run("ip", "netns", "add", ns)
        node = Node(name, ns, self.address(host), port)
        self.nodes[name] = node
        self._save()
        run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        return node

    def down(self) -> None:
        """Kill every process of every namespace, delete namespaces, leg and directory.
        Idempotent; keeps going past errors and raises the first one at the end."""
        errors: list[BaseException] = []
        for node in list(self.nodes.values()):
            try:
                _delete_netns(node.ns)
            except BaseException as e:
                errors.append(e)
        try:
            _delete_netns(self.switch)
        except BaseException as e:
            errors.append(e)
        if self.leg:
            run("ip", "link", "del", self.leg, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        (REGISTRY / f"{self.prefix}.json").unlink(missing_ok=True)
        self._up = False
        if errors:
            raise errors[0]

    # -- faults ------------------------------------------------------------------------------
    def partition(self, name: str) -> None:
        """Cut node ``name`` off the bridge (its switch port goes down)."""
        run("ip", "-n", self.switch, "link", "set", self.nodes[name].port, "down")

    def heal(self, name: str) -> None:
        run("ip", "-n", self.switch, "link", "set", self.nodes[name].port, "up")

    def is_partitioned(self, name: str) -> bool:
        p = run("ip", "-n", self.switch, "-j", "link", "show", self.nodes[name].port)
        return "UP" not in json.loads(p.stdout)[0].get("flags", [])

    # -- the safety rule ----------------------------------------------------------------------
    def root_addr(self, addr: str) -> str:
        """``addr``, after proving the root namespace reaches it through the test bridge
        leg (raises :class:`UnsafeTestRoute` otherwise). Call before every root-namespace
        connection to a test address."""
        require_test_route(addr, self.leg, self.subnet)
        return addr

    # -- registry ----------------------------------------------------------------------------
    def _save(self) -> None:
        pid = os.getpid()
        state = {
            "pid": pid,
            "starttime": proc_start_time(pid),
            "namespaces": [self.switch, *(n.ns for n in self.nodes.values())],
            "leg": self.leg,
            "dir": str(self.dir),
        }
        (REGISTRY / f"{self.prefix}.json").write_text(json.dumps(state))


def _owner_alive(pid: int, starttime: str | None) -> bool:
    if not pid_alive(pid):
        return False
    return starttime is None or proc_start_time(pid) == starttime


def sweep_stale() -> list[str]:
    """Remove what runs whose creating process is gone left behind: their processes,
    namespaces, root legs and directories. Returns what was removed."""
    removed: list[str] = []
    if REGISTRY.is_dir():
        for f in REGISTRY.glob(f"{PREFIX}*.json"):
            try:
                st = json.loads(f.read_text())
            except (OSError, ValueError):
                f.unlink(missing_ok=True)
                continue
            if _owner_alive(int(st.get("pid", 0)), st.get("starttime")):
                continue
            for ns in st.get("namespaces", []):
                _delete_netns(ns)
                removed.append(ns)
            if st.get("leg"):
                run("ip", "link", "del", st["leg"], check=False)
                removed.append(st["leg"])
            if st.get("dir", "").startswith(str(BASE) + "/"):
                shutil.rmtree(st["dir"], ignore_errors=True)
            f.unlink(missing_ok=True)
    # leftovers without a registry entry (e.g. killed between "ip netns add" and the save)
    for ns in run("ip", "netns", "list", check=False).stdout.split("\n"):
        ns = ns.split(" ")[0]
        m = _NAME_RE.match(ns)
        if m and not pid_alive(int(m.group(1))):
            _delete_netns(ns)
            removed.append(ns)
    links = json.loads(run("ip", "-j", "link", "show", check=False).stdout or "[]")
    for link in links:
        m = _NAME_RE.match(link.get("ifname", ""))
        if m and not pid_alive(int(m.group(1))):
            run("ip", "link", "del", link["ifname"], check=False)
            removed.append(link["ifname"])
    if BASE.is_dir():
        for d in BASE.iterdir():
            m = _NAME_RE.match(d.name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
    return removed


def _free_octet() -> int:
    """A third octet k such that the root namespace has no route for 10.77.k.0/24 yet
    (another run's leg), starting from a pid-derived guess."""
    routes = json.loads(run("ip", "-j", "route", "show", check=False).stdout or "[]")
    taken: set[int] = set()
    for r in routes:
        dst = r.get("dst", "")
        try:
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
        except ValueError:
            continue
        if net.subnet_of(ipaddress.ip_network("10.77.0.0/16")):  # type: ignore[arg-type]
            taken.add(int(str(net.network_address).split(".")[2]))
    start = 20 + os.getpid() % 200
    for i in range(220):
        k = 20 + (start - 20 + i) % 220
        if k not in taken:
            return k
    raise RuntimeError("no free 10.77.x.0/24 test subnet")
