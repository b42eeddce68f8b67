"""A whole test cluster: the network, N libvirt hosts, shared storage and etcd.

    with Cluster(hosts=3, etcd=True) as c:
        g = c.new_guest()            # disks on the shared directory
        g.start(c.hosts[0]); g.wait_heartbeat()
        c.hosts[0].kill()            # kill -9 of every process of h1
        g.start(c.hosts[1])          # the same disks on h2
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType

from tests.multihost.etcd import EtcdCluster
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host
from tests.multihost.net import TestNet

__all__ = ["Cluster"]

FIRST_HOST_OCTET = 11  # h1 = .11, h2 = .12, ...


class Cluster:
    def __init__(self, hosts: int = 3, *, etcd: bool = True, sshd: bool = False,
                 root_leg: bool = True, lockd: bool = False) -> None:
        """``lockd``: every host guards disks with virtlockd leases in ``shared/lockspace``
        (``lock_manager = "lockd"``), so two hosts cannot run the same disk."""
        self.n_hosts, self.with_etcd, self.with_sshd = hosts, etcd, sshd
        self.with_lockd = lockd
        self.net = TestNet(root_leg=root_leg)
        self.hosts: list[Host] = []
        self.etcd: EtcdCluster | None = None
        self.guests: list[Guest] = []

    @property
    def shared(self) -> Path:
        """The shared storage: a directory at the same path on every host."""
        return self.net.dir / "shared"

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    # -- lifecycle --------------------------------------------------------------------------
    def up(self) -> Cluster:
        try:
            self.net.up()
            self.shared.mkdir()
            os.chmod(self.shared, 0o777)
            if self.with_sshd:
                self._ssh_keys()
            lockspace = self.shared / "lockspace" if self.with_lockd else None
            if lockspace is not None:
                lockspace.mkdir()
            for i in range(self.n_hosts):
                node = self.net.add_node(f"h{i + 1}", FIRST_HOST_OCTET + i)
                host = Host(self.net, node, sshd=self.with_sshd, lockspace=lockspace)
                host.prepare()
                if self.with_sshd:
                    self._sshd_config(host)
                self.hosts.append(host)
            if self.with_etcd:
                self.etcd = EtcdCluster(self.net)
                for i in range(self.etcd.size):  # nodes first, members start in parallel
                    self.etcd.nodes.append(self.net.add_node(f"e{i + 1}", 101 + i))
                self.etcd.dir.mkdir(parents=True, exist_ok=True)
                for node in self.etcd.nodes:
                    self.etcd.start_member(node.name, new=True)
            for host in self.hosts:
                host.start(wait=False)
            for host in self.hosts:
                host.wait_libvirtd()
            if self.etcd is not None:
                self.etcd.wait_healthy()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Everything off, even after failures: guests, etcd, hosts (SIGKILL), namespaces,
        the root leg and the files."""
        for g in self.guests:
            try:
                g.cleanup()
            except Exception:
                pass
        if self.etcd is not None:
            self.etcd.down()
        for h in self.hosts:
            h.close_connections()
        self.net.down()

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def ensure_healthy(self) -> None:
        """Undo the faults of a previous test: heal partitions, restart (reboot) killed
        hosts and libvirtds, restart killed etcd members, remove guests."""
        for g in self.guests:
            g.cleanup()
        self.guests.clear()
        for h in self.hosts:
            if self.net.is_partitioned(h.name):
                h.heal()
            if not h.alive():
                h.start()
            elif h.daemon_pid("libvirtd") is None:
                h.restart_libvirtd()
        if self.etcd is not None:
            dead = [n.name for n in self.etcd.nodes if not self.etcd.member_alive(n.name)]
            for n in self.etcd.nodes:
                if self.net.is_partitioned(n.name):
                    self.net.heal(n.name)
            for name in dead:
                self.etcd.start_member(name)
            self.etcd.wait_healthy()

    # -- guests -----------------------------------------------------------------------------
    def new_guest(self, *, local_to: Host | None = None, writer_rate: int = 20,
                  memory_mib: int = 128) -> Guest:
        """A guest on the shared storage, or on ``local_to``'s own image directory."""
        storage = self.shared if local_to is None else local_to.dir / "images"
        g = Guest(self.net.prefix, storage, writer_rate=writer_rate, memory_mib=memory_mib)
        self.guests.append(g)
        return g

    # -- ssh --------------------------------------------------------------------------------
    @property
    def ssh_key(self) -> Path:
        return self.net.dir / "ssh" / "id_ed25519"

    def ssh_command(self, host: Host) -> list[str]:
        """ssh to ``host`` as root; run it inside another host (``other.run(*cmd)``)."""
        return ["ssh", "-i", str(self.ssh_key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", f"root@{host.addr}"]

    def ssh_uri(self, host: Host) -> str:
        """qemu+ssh URI of ``host`` (for clients inside another host)."""
        return (f"qemu+ssh://root@{host.addr}/system?keyfile={self.ssh_key}"
                "&no_verify=1&no_tty=1")

    def _ssh_keys(self) -> None:
        d = self.ssh_key.parent
        d.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_key)],
                       check=True)
        (d / "authorized_keys").write_text(Path(f"{self.ssh_key}.pub").read_text())

    def _sshd_config(self, host: Host) -> None:
        key = host.dir / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        (host.dir / "sshd_config").write_text(
            f"ListenAddress {host.addr}\nPort 22\nHostKey {key}\nPidFile /run/sshd.pid\n"
            f"AuthorizedKeysFile {self.ssh_key.parent / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        )
