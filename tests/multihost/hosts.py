"""Libvirt hosts in namespaces: each its own network, mount and UTS namespace, its own
/run, /etc/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, and its own
virtlogd, virtlockd and libvirtd (listening on qemu+tcp on its test address).

From the root namespace a host's libvirt is reached through its unix socket
(:attr:`Host.uri`); host-to-host traffic (migration, etcd, ssh) runs inside the hosts.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from tests.multihost.net import Node, TestNet, kill_netns, netns_pids, run

__all__ = ["Host"]

_BIND = {  # per-host directory -> mount point inside the host
    "run": "/run",
    "etc-libvirt": "/etc/libvirt",
    "lib-libvirt": "/var/lib/libvirt",
    "log-libvirt": "/var/log/libvirt",
    "cache-libvirt": "/var/cache/libvirt",
}
_LIBVIRTD_CONF = {
    "listen_tls": "0",
    "listen_tcp": "1",
    "auth_tcp": '"none"',
    "auth_unix_rw": '"none"',
    "auth_unix_ro": '"none"',
}
_QEMU_CONF = {
    # `ip netns exec` remounts /sys; the hosts' QEMU cgroups would collide by name
    "cgroup_controllers": "[ ]",
    # remembered owners (xattrs) on shared storage outlive a killed host and confuse the next
    "remember_owner": "0",
}


def _write_conf(src: Path, dst: Path, settings: dict[str, str]) -> None:
    """Copy a libvirt .conf, dropping the keys we set, then append ours."""
    text = src.read_text() if src.is_file() else ""
    keys = "|".join(re.escape(k) for k in settings)
    kept = [ln for ln in text.splitlines() if not re.match(rf"^\s*({keys})\s*=", ln)]
    kept += [f"{k} = {v}" for k, v in settings.items()]
    dst.write_text("\n".join(kept) + "\n")


class Host:
    """One libvirt host: ``name`` (h1, h2...) on ``node`` of ``net``, files under ``dir``."""

    def __init__(self, net: TestNet, node: Node, *, sshd: bool = False,
                 qemu_conf: dict[str, str] | None = None,
                 lockspace: Path | None = None) -> None:
        self.net, self.node, self.name = net, node, node.name
        self.dir = net.dir / node.name
        self.host_uuid = str(uuid.uuid4())
        self.sshd = sshd
        self.qemu_conf = {**_QEMU_CONF, **(qemu_conf or {})}
        # disk guard: virtlockd leases in a lockspace on the shared storage
        self.lockspace = lockspace
        if lockspace is not None:
            self.qemu_conf["lock_manager"] = '"lockd"'
        self.init: subprocess.Popen[bytes] | None = None
        self._conns: list[Any] = []
        self._conn: Any = None

    # -- addresses --------------------------------------------------------------------------
    @property
    def addr(self) -> str:
        return self.node.addr

    @property
    def ns(self) -> str:
        return self.node.ns

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """Root-namespace URI: the host's unix socket (no network traffic)."""
        return f"qemu:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """The URI other hosts use (only from inside a host namespace, e.g. in run())."""
        return f"qemu+tcp://{self.addr}/system"

    # -- lifecycle --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Per-host directories and config, seeded from the system's /etc/libvirt."""
        for d in _BIND:
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        etc = self.dir / "etc-libvirt"
        for conf in Path("/etc/libvirt").glob("*.conf"):
            shutil.copy2(conf, etc / conf.name)
        if Path("/etc/libvirt/nwfilter").is_dir() and not (etc / "nwfilter").exists():
            shutil.copytree("/etc/libvirt/nwfilter", etc / "nwfilter")
        (etc / "qemu").mkdir(exist_ok=True)  # no domains, no network autostart links
        _write_conf(Path("/etc/libvirt/libvirtd.conf"), etc / "libvirtd.conf",
                    {**_LIBVIRTD_CONF, "listen_addr": f'"{self.addr}"',
                     "host_uuid": f'"{self.host_uuid}"'})
        _write_conf(Path("/etc/libvirt/qemu.conf"), etc / "qemu.conf", self.qemu_conf)
        if self.lockspace is not None:
            _write_conf(Path("/etc/libvirt/qemu-lockd.conf"), etc / "qemu-lockd.conf",
                        {"auto_disk_leases": "1", "require_lease_for_disks": "1",
                         "file_lockspace_dir": f'"{self.lockspace}"'})
        # QEMU's capability cache from the system libvirtd (same binaries): saves the ~4 s
        # probe per fresh host. libvirt re-probes on its own if the cache does not match.
        caps = Path("/var/cache/libvirt/qemu/capabilities")
        dst = self.dir / "cache-libvirt" / "qemu" / "capabilities"
        if caps.is_dir() and not dst.exists():
            shutil.copytree(caps, dst)
        for sub in ("qemu", "images"):
            (self.dir / "lib-libvirt" / sub).mkdir(exist_ok=True)
        (self.dir / "init.sh").write_text(self._init_script())

    def _init_script(self) -> str:
        binds = "\n".join(f"mount --bind {self.dir / d} {mp}" for d, mp in _BIND.items())
        sshd = ""
        if self.sshd:
            sshd = (
                "mkdir -p /run/sshd\n"
                f"/usr/sbin/sshd -f {self.dir / 'sshd_config'} -E {self.dir / 'sshd.log'}\n"
            )
        return (
            "set -e\n"
            f"{binds}\n"
            "mkdir -p /run/libvirt /run/lock\n"
            f"hostname {self.name}\n"
            "virtlogd -d\nvirtlockd -d\nlibvirtd -d --listen\n"
            f"{sshd}"
            "exec sleep infinity\n"
        )

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the host's daemons (also after a kill: a reboot, /run starts empty).
        ``wait=False`` returns at once; call :meth:`wait_libvirtd` later."""
        if self.alive():
            return
        kill_netns(self.ns)
        run_dir = self.dir / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        log = open(self.dir / "init.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.init = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts",
                 "--propagation", "private", "sh", str(self.dir / "init.sh")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        if wait:
            self.wait_libvirtd(timeout)

    def wait_libvirtd(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.init is not None and self.init.poll() is not None:
                raise RuntimeError(f"{self.name}: init exited {self.init.returncode}: "
                                   f"{self._log_tail()}")
            if self.socket.exists():
                p = run("virsh", "-c", self.uri, "uri", check=False, timeout=10)
                if p.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: libvirtd not answering: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return (self.dir / "init.log").read_text()[-1500:]
        except OSError:
            return ""

    def alive(self) -> bool:
        """Whether the host's init is running (its namespaces exist)."""
        return self.init is not None and self.init.poll() is None

    def pids(self) -> list[int]:
        return netns_pids(self.ns)

    def daemon_pid(self, name: str) -> int | None:
        """Pid of this host's ``libvirtd``/``virtlogd``/``virtlockd``/``qemu-system-x86``."""
        for pid in self.pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith(name[:15]):
                return pid
        return None

    # -- faults -----------------------------------------------------------------------------
    def kill(self) -> None:
        """Host crash: SIGKILL every process of the host (daemons, QEMUs, init)."""
        self.close_connections()
        kill_netns(self.ns)
        if self.init is not None:
            self.init.wait(5)

    def kill_libvirtd(self) -> int:
        """Daemon crash: SIGKILL libvirtd only; QEMUs survive. Returns the killed pid."""
        pid = self.daemon_pid("libvirtd")
        if pid is None:
            raise RuntimeError(f"{self.name}: no libvirtd")
        self.close_connections()
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_libvirtd(self, timeout: float = 30.0) -> None:
        (self.dir / "run" / "libvirtd.pid").unlink(missing_ok=True)
        self.run("libvirtd", "-d", "--listen")
        self.wait_libvirtd(timeout)

    def partition(self) -> None:
        self.net.partition(self.name)

    def heal(self) -> None:
        self.net.heal(self.name)

    # -- running things inside the host ------------------------------------------------------
    def enter(self) -> list[str]:
        """Command prefix that enters the host's network, mount and UTS namespaces."""
        if not self.alive() or self.init is None:
            return ["ip", "netns", "exec", self.ns]  # network only (host is down)
        return ["nsenter", "-t", str(self.init.pid), "-n", "-m", "-u", "--"]

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the host and wait for it."""
        return run(*self.enter(), *cmd, check=check, timeout=timeout)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the host (a host kill kills it too)."""
        kw.setdefault("start_new_session", True)
        return subprocess.Popen([*self.enter(), *cmd], **kw)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """virsh against this host's libvirtd, run from the root namespace over the socket."""
        return run("virsh", "-c", self.uri, *args, check=check)

    # -- libvirt ----------------------------------------------------------------------------
    def connect(self) -> Any:
        """A new libvirt connection from the root namespace (unix socket); closed on kill,
        libvirtd kill and teardown."""
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        conn = libvirt.open(self.uri)
        self._conns.append(conn)
        return conn

    def conn(self) -> Any:
        """The host's shared libvirt connection (opened on first use, reopened when dead)."""
        if self._conn is None or not self._conn.isAlive():
            self._conn = self.connect()
        return self._conn

    def close_connections(self) -> None:
        for c in self._conns:
            try:
                c.close()
            except Exception:
                pass
        self._conns.clear()
        self._conn = None

    def domain_states(self) -> dict[str, int]:
        """{name: virDomainState} of every domain this host knows (empty if it is down)."""
        if not self.alive():
            return {}
        return {d.name(): d.state()[0] for d in self.conn().listAllDomains(0)}
