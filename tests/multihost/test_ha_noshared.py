"""HA without shared storage (issue 10) on the 3-host harness: an HA VM whose disks are
local to h1 (``ha_storage = "local"``), backed up to a file:// repository on the
harness's shared directory (readable from every host, with its password file there).

``kill -9`` of every process of h1 → the leader orders the restore on a survivor, whose
agent boots the VM by instant restore from the newest snapshot; the guest-agent heartbeat
comes (the ``ready`` event); the ``started`` event names the snapshot and the data lost
(detection time − snapshot time); at no moment (0.1 s polls of libvirt on every host)
does the VM run twice. With a replica on h3 (``replica_to``), placement prefers h3 and the
VM starts there from the replica's newest point instead. About 25 + 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host
from tests.multihost.test_ha_agents import Agents, first_running, running_on, watch

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.etcd]
ROOT = Path(__file__).resolve().parents[2]
VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def noshared_config(cluster: Cluster, h: Host, prefix: str, vm: str, repo: Path,
                    pw: Path, replica_to: str | None = None) -> Path:
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
""" + (f'replica_to = "{replica_to}"\n' if replica_to else ""))
    return cfg


class NosharedAgents(Agents):
    def __init__(self, cluster: Cluster, guest: Guest, repo: Path, pw: Path,
                 replica_to: str | None = None) -> None:
        super().__init__(cluster, {"db": guest})
        self.vm, self.repo, self.pw, self.replica_to = guest.name, repo, pw, replica_to

    def start(self, h: Host) -> None:
        cfg = noshared_config(self.cluster, h, self.prefix, self.vm, self.repo, self.pw,
                              self.replica_to)
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


def _backed_up(cluster: Cluster) -> tuple[Guest, Path, Path, dict[str, str], str]:
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


def _kill_and_follow(cluster: Cluster, g: Guest, agents: NosharedAgents,
                     ) -> tuple[str, float, dict[str, Any], dict[str, Any]]:
    """Start the agents, kill -9 h1, watch (never twice) until the VM runs elsewhere and
    is ready; (host, seconds from the kill to running, started event, detected event)."""
    h1 = cluster.hosts[0]
    g.start(h1)
    g.wait_heartbeat(120)
    for h in cluster.hosts:
        agents.start(h)
    deadline = time.monotonic() + 30
    while not agents.leader():
        assert time.monotonic() < deadline, agents.logs()
        time.sleep(0.3)
    agents.wait_published(g.name, "h1")
    t_kill = time.monotonic()
    h1.kill()
    seen = watch(cluster, {"db": g}, lambda: bool(running_on(cluster, g)), 120,
                 "restore after the kill", agents)
    t_start, host = first_running(seen["db"], t_kill)
    assert host != "h1"
    deadline = time.monotonic() + 120
    events: list[dict[str, Any]] = []
    while not any(e["kind"] == "ready" and e["vm"] == g.name for e in events):
        assert not any(e["kind"] == "gave-up" and e["vm"] == g.name for e in events), \
            (events, agents.logs())
        assert time.monotonic() < deadline, (events, agents.logs())
        time.sleep(0.5)
        events = agents.events()
        assert len(running_on(cluster, g)) == 1, running_on(cluster, g)
    started = [e for e in events if e["kind"] == "started" and e["vm"] == g.name]
    assert len(started) == 1, events
    detected = next(x for x in events if x["kind"] == "detected" and x["host"] == "h1")
    assert started[0]["host"] == host
    return host, t_start - t_kill, started[0], detected


def test_local_disk_vm_restarts_from_its_backup(mh_cluster_session: Cluster) -> None:
    cluster = mh_cluster_session
    cluster.ensure_healthy()
    g, repo, pw, _env, snap_id = _backed_up(cluster)
    agents = NosharedAgents(cluster, g, repo, pw)
    try:
        host, after, e, detected = _kill_and_follow(cluster, g, agents)
        assert e["detail"]["restore"] == "snapshot"
        assert e["detail"]["point"]["id"].startswith(snap_id[:8]), (e, snap_id)
        assert f"from snapshot {snap_id[:8]} of " in e["reason"], e
        assert "(instant restore; lost ≤ " in e["reason"], e
        lost = e["detail"]["lost_s"]
        assert lost == pytest.approx(detected["time"] - e["detail"]["point"]["time"],
                                     abs=0.2), (e, detected)
        assert lost > 0
        print(f"kill -9 h1: {g.name} running on {host} {after:.1f}s after the kill; "
              f"{e['reason']}")
    finally:
        agents.stop()
        kill_restores(g.name)


def test_local_disk_vm_restarts_from_its_replica(mh_cluster_session: Cluster) -> None:
    """The same VM with a replica on h3 (fed from the repository, restore points kept by
    vmdr replicate): placement prefers h3 and the VM starts there from the replica's
    newest point, not by instant restore."""
    cluster = mh_cluster_session
    cluster.ensure_healthy()
    g, repo, pw, _env, _snap = _backed_up(cluster)
    h3 = cluster.hosts[2]
    h3.run("env", f"PYTHONPATH={ROOT / 'src'}", f"VMDR_PASSWORD_FILE={pw}",
           sys.executable, "-m", "vmdr.cli.main", "replicate", g.name, "--feed",
           "repository", "--repo", str(repo), "--to", "qemu:///system", timeout=300)
    agents = NosharedAgents(cluster, g, repo, pw, replica_to="h3")
    try:
        host, after, e, detected = _kill_and_follow(cluster, g, agents)
        assert host == "h3" and e["detail"]["restore"] == "replica", e
        assert e["reason"].startswith(f"{g.name} on h3 from replica point "), e
        assert "(replica standby; lost ≤ " in e["reason"], e
        assert e["detail"]["lost_s"] == pytest.approx(
            detected["time"] - e["detail"]["point"]["time"], abs=0.2)
        print(f"kill -9 h1: {g.name} running on {host} {after:.1f}s after the kill; "
              f"{e['reason']}")
    finally:
        agents.stop()
        for name in (g.name, f"{g.name}-replica"):
            try:
                h3.virsh("destroy", name, check=False)
                h3.virsh("undefine", name, check=False)
            except Exception:
                pass
