"""Setup shared by the HA-without-shared-storage tests on the 3-host harness
(test_ha_noshared.py, test_ha_noshared_kill.py): the agents' config with a local-disk HA
VM restored from a file:// repository on the shared directory, and a guest backed up
there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.multihost.cluster import Cluster
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host
from tests.multihost.test_ha_agents import Agents

ROOT = Path(__file__).resolve().parents[2]
VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def noshared_config(cluster: Cluster, h: Host, prefix: str, vm: str, repo: Path,
                    pw: Path, replica_to: str | None = None, extra: str = "") -> Path:
    assert cluster.etcd is not None, "an etcd cluster is needed"
    shared = Path(cluster.shared)
    hosts = "".join(f'[hosts.{x.name}]\nlocation = "dc"\nuri = "{x.tcp_uri}"\n'
                    for x in cluster.hosts)
    cfg = shared / f"ha-noshared-{h.name}.toml"
    cfg.write_text(f"""
connect = "qemu:///system"
[agent]
host = "{h.name}"
state = "{shared}/ha-noshared-{h.name}-{os.getpid()}.db"
etcd = [{", ".join(f'"{e}"' for e in cluster.etcd.endpoints)}]
etcd_prefix = "{prefix}"
[repositories.dr]
url = "file://{repo}"
password_file = "{pw}"
location = "dc"
[locations.dc]
kind = "building"
{hosts}
[ha]
ready_delay = "0s"
[vm.{vm}]
ha = true
ha_storage = "local"
ha_repository = "dr"
""" + (f'replica_to = "{replica_to}"\n' if replica_to else "") + extra)
    return cfg


class NosharedAgents(Agents):
    def __init__(self, cluster: Cluster, guest: Guest, repo: Path, pw: Path,
                 replica_to: str | None = None, extra: str = "") -> None:
        super().__init__(cluster, {"db": guest})
        self.vm, self.repo, self.pw, self.replica_to = guest.name, repo, pw, replica_to
        self.extra = extra  # more lines of the VM's [vm.NAME] table

    def start(self, h: Host) -> None:
        cfg = noshared_config(self.cluster, h, self.prefix, self.vm, self.repo, self.pw,
                              self.replica_to, self.extra)
        log = open(self.shared / f"ha-agent-{h.name}.log", "ab")  # noqa: SIM115
        self.procs[h.name] = h.popen(sys.executable, "-m", "vmdr.agent", "--config",
                                     str(cfg), env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)


def vmdr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*VMDR, *args], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, (p.stdout, p.stderr)
    return p


def kill_restores(name: str) -> None:
    """SIGKILL the instant-restore children a survivor's agent started for *name* (by
    the PIDs whose command line names it)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"instant-restore" in cmd and any(name.encode() in a for a in cmd):
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                pass


def backed_up(cluster: Cluster) -> tuple[Guest, Path, Path, dict[str, str], str]:
    """A guest with local disks on h1, defined there and backed up offline to a file://
    repository on the shared directory; (guest, repo, password file, env, snapshot ID)."""
    h1 = cluster.hosts[0]
    g = cluster.new_guest(local_to=h1, writer_rate=0)
    g.known.update(cluster.hosts)  # restored anywhere: clean up everywhere
    work = Path(cluster.shared) / f"noshared-{os.getpid()}-{g.name}"
    work.mkdir()
    repo, pw = work / "repo", work / "pw"
    pw.write_text("ha noshared test passphrase\n")
    pw.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), VMDR_REPO=str(repo),
               VMDR_PASSWORD_FILE=str(pw), VMDR_LOCK_DIR=str(work / "locks"))
    env.pop("VMDR_CONFIG", None)
    vmdr(env, "repo", "init")
    g.define(h1)  # offline backup: defined, not running (the test estate's way)
    doc = json.loads(vmdr(env, "backup", "--json", g.name, "--connect", h1.uri).stdout)
    res = doc["results"][0]
    assert res["status"] == "ok", doc
    return g, repo, pw, env, str(res.get("snapshot") or res.get("id"))
