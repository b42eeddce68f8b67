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

import sys
import time
from typing import Any

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.guests import Guest
from tests.multihost.noshared_setup import ROOT, NosharedAgents, backed_up, kill_restores
from tests.multihost.test_ha_agents import first_running, running_on, watch

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.etcd]


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
    g, repo, pw, _env, snap_id = backed_up(cluster)
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
    g, repo, pw, _env, _snap = backed_up(cluster)
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
