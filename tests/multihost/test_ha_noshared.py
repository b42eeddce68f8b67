"""HA without shared storage (issue 10) on the 3-host harness: an HA VM whose disks are
local to h1 (``ha_storage = "local"``), backed up to a file:// repository on the
harness's shared directory (readable from every host, with its password file there).

``kill -9`` of every process of h1 → the leader orders the restore on a survivor, whose
agent boots the VM by instant restore from the newest snapshot; the guest-agent heartbeat
comes (the ``ready`` event); the ``started`` event names the snapshot and the data lost
(detection time − snapshot time); at no moment (0.1 s polls of libvirt on every host)
does the VM run twice.
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
                    pw: Path) -> Path:
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
""")
    return cfg


class NosharedAgents(Agents):
    def __init__(self, cluster: Cluster, guest: Guest, repo: Path, pw: Path) -> None:
        super().__init__(cluster, {"db": guest})
        self.vm, self.repo, self.pw = guest.name, repo, pw

    def start(self, h: Host) -> None:
        cfg = noshared_config(self.cluster, h, self.prefix, self.vm, self.repo, self.pw)
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


def test_local_disk_vm_restarts_from_its_backup(mh_cluster_session: Cluster) -> None:
    cluster = mh_cluster_session
    cluster.ensure_healthy()
    h1 = cluster.hosts[0]
    g = cluster.new_guest(local_to=h1, writer_rate=0)
    g.known.update(cluster.hosts)  # restored anywhere: clean up everywhere
    work = Path(cluster.shared) / f"noshared-{os.getpid()}"
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
    snap_id = str(res.get("snapshot") or res.get("id"))
    agents = NosharedAgents(cluster, g, repo, pw)
    try:
        g.start(h1)
        g.wait_heartbeat(120)
        for h in cluster.hosts:
            agents.start(h)
        deadline = time.monotonic() + 30
        while not agents.leader():
            assert time.monotonic() < deadline, agents.logs()
            time.sleep(0.3)
        agents.wait_published(g.name, "h1")
        leader = agents.leader()

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
        e = started[0]
        detected = next(x for x in events if x["kind"] == "detected" and x["host"] == "h1")
        assert e["host"] == host and e["detail"]["restore"] == "snapshot"
        assert e["detail"]["point"]["id"].startswith(snap_id[:8]), (e, snap_id)
        assert f"from snapshot {snap_id[:8]} of " in e["reason"], e
        assert "(instant restore; lost ≤ " in e["reason"], e
        lost = e["detail"]["lost_s"]
        assert lost == pytest.approx(detected["time"] - e["detail"]["point"]["time"],
                                     abs=0.2), (e, detected)
        assert lost > 0
        print(f"kill -9 h1 (leader {leader}): {g.name} running on {host} "
              f"{t_start - t_kill:.1f}s after the kill; {e['reason']}")
    finally:
        agents.stop()
        kill_restores(g.name)
