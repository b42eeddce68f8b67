"""Host failover executed by the agents (issue 10, "Host failure"), on the 3-host harness.

Each host runs ``python -m vmdr.agent`` inside its namespaces against the three-member
etcd. Two HA guests on shared storage: ``db`` (priority group 1, ready = guest-agent
heartbeat + 2 s) and ``app`` (group 2, depends on db). One run, few boots:

1. both run on h2 (h1 leads): **partition** h2 → it fences itself (destroys both), the
   leader restarts db, then app only after db's heartbeat + 2 s; at every moment (0.1 s
   polls of libvirt on all hosts) each guest runs at most once, and afterwards the
   guest's record stream is one consistent history;
2. h2 heals and rejoins; db went to h1 (``hosts = ["h1"]``, should), the leader's host;
   **kill -9** of h1 — the leader with it — → a new leader restarts db on a survivor
   within 20 s of the kill (goal 10 s; bench/ha.py measures it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.guest.records import check_records
from tests.multihost.cluster import Cluster
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.etcd]
ROOT = Path(__file__).resolve().parents[2]
READY_DELAY = 2.0


def agent_config(cluster: Cluster, h: Host, prefix: str, guests: dict[str, Guest], *,
                 ready_delay: float = READY_DELAY, extra_vm: dict[str, str] | None = None,
                 app_ha: bool = True) -> Path:
    assert cluster.etcd is not None, "an etcd cluster is needed"
    shared = Path(cluster.shared)
    hosts = "".join(f'[hosts.{x.name}]\nlocation = "dc"\nuri = "{x.tcp_uri}"\n'
                    for x in cluster.hosts)
    extra = extra_vm or {"db": 'hosts = ["h1"]\nhosts_rule = "should"'}
    db, app = guests["db"].name, guests["app"].name
    cfg = shared / f"ha-agent-{h.name}.toml"
    cfg.write_text(f"""
connect = "qemu:///system"
[agent]
host = "{h.name}"
state = "{shared}/ha-agent-{h.name}-{os.getpid()}.db"
etcd = [{", ".join(f'"{e}"' for e in cluster.etcd.endpoints)}]
etcd_prefix = "{prefix}"
[locations.dc]
kind = "building"
{hosts}
[ha]
ready_delay = "0s"
[vm.{db}]
ha = true
boot_group = 1
ready_delay = "{ready_delay:g}s"
{extra.get("db", "")}
""" + ("" if app == db else f"""[vm.{app}]
ha = {"true" if app_ha else "false"}
boot_group = 2
depends_on = ["{db}"]
{extra.get("app", "")}
"""))
    return cfg


class Agents:
    """The agents of the harness's hosts (also used by bench/ha.py)."""

    def __init__(self, cluster: Cluster, guests: dict[str, Guest], *,
                 ready_delay: float = READY_DELAY, extra_vm: dict[str, str] | None = None,
                 app_ha: bool = True) -> None:
        self.cluster = cluster
        self.guests = guests
        self.opts: dict[str, Any] = {"ready_delay": ready_delay, "extra_vm": extra_vm,
                                     "app_ha": app_ha}
        self.prefix = f"/vmdr-ha-{os.getpid()}-{int(time.time())}/"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.shared = Path(cluster.shared)

    def start(self, h: Host) -> None:
        cfg = agent_config(self.cluster, h, self.prefix, self.guests, **self.opts)
        log = open(self.shared / f"ha-agent-{h.name}.log", "ab")  # noqa: SIM115
        self.procs[h.name] = h.popen(sys.executable, "-m", "vmdr.agent", "--config",
                                     str(cfg), env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {h}\n" + (self.shared / f"ha-agent-{h}.log").read_text(
            errors="replace")[-2500:] for h in self.procs)

    def etcd(self, *args: str) -> str:
        live = next(h for h in self.cluster.hosts
                    if h.alive() and not self.cluster.net.is_partitioned(h.name))
        assert self.cluster.etcd is not None
        p = self.cluster.etcd.ctl(*args, host=live, check=False)
        return str(p.stdout)

    def leader(self) -> str:
        return self.etcd("get", f"{self.prefix}leader", "--print-value-only").strip()

    def wait_leader(self, host: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.leader() != host:
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.3)

    def wait_member(self, host: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.etcd("get", f"{self.prefix}members/{host}", "--keys-only").strip():
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.3)

    def wait_published(self, vm: str, host: str, timeout: float = 30) -> None:
        """``ha/where/<vm>`` names *host* (its agent published the domain)."""
        deadline = time.monotonic() + timeout
        while f'"host": "{host}"' not in self.etcd("get", f"{self.prefix}ha/where/{vm}",
                                                    "--print-value-only"):
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.3)

    def events(self) -> list[dict[str, Any]]:
        out = self.etcd("get", "--prefix", f"{self.prefix}ha/events/", "--print-value-only")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def running_on(cluster: Cluster, g: Guest) -> list[str]:
    return [h.name for h in cluster.hosts if g.is_running_on(h)]


def watch(cluster: Cluster, guests: dict[str, Guest], until: Any, timeout: float,
          what: str, agents: Agents) -> dict[str, list[tuple[float, list[str]]]]:
    """Poll libvirt on every host every 0.1 s until ``until()``; fail on a double run."""
    seen: dict[str, list[tuple[float, list[str]]]] = {n: [] for n in guests}
    deadline = time.monotonic() + timeout
    while True:
        for name, g in guests.items():
            hosts = running_on(cluster, g)
            assert len(hosts) <= 1, f"{name} runs twice: {hosts}"
            if not seen[name] or seen[name][-1][1] != hosts:
                seen[name].append((time.monotonic(), hosts))
        if until():
            return seen
        assert time.monotonic() < deadline, f"{what}: timed out\n{agents.logs()}"
        time.sleep(0.1)


def first_running(seen: list[tuple[float, list[str]]], after: float) -> tuple[float, str]:
    for t, hosts in seen:
        if t >= after and hosts:
            return t, hosts[0]
    raise AssertionError(f"never running after {after}: {seen}")


def test_agents_fence_and_fail_over(mh_cluster_session: Cluster) -> None:
    cluster = mh_cluster_session
    cluster.ensure_healthy()
    h1, h2, h3 = cluster.hosts
    guests = {"db": cluster.new_guest(writer_rate=20), "app": cluster.new_guest(writer_rate=0)}
    for g in guests.values():
        g.known.update(cluster.hosts)  # agents define them anywhere: clean up everywhere
        g.start(h2)
    agents = Agents(cluster, guests)
    try:
        agents.start(h1)
        agents.wait_leader("h1")
        agents.start(h2)
        agents.start(h3)
        guests["db"].wait_heartbeat(120)
        guests["app"].wait_heartbeat(120)
        seq_before = guests["db"].wait_writer()
        db, app = guests["db"].name, guests["app"].name
        for g in guests.values():
            agents.wait_published(g.name, "h2")

        # 1. partition h2: self-fencing, never twice, boot order with readiness
        t_cut = time.monotonic()
        h2.partition()
        seen = watch(cluster, guests, lambda: all(running_on(cluster, g) and
                                                  running_on(cluster, g) != ["h2"]
                                                  for g in guests.values()),
                     90, "failover after the partition", agents)
        gone = [t for t, hosts in seen["db"] if not hosts]
        assert gone, (seen, agents.events(), agents.logs())
        # fenced before anyone else started it (watch() fails on any moment with two):
        # until it was gone it ran on h2 only; and before the leader's earliest restart:
        # lease expiry + fence delay (5 + 2 s); the fencing time itself is measured in
        # bench/ha.py, not asserted here. (The first poll may come after t_cut: the run
        # on h2 it sees is the one before the fence, not a restart.)
        assert all(hosts == ["h2"] for t, hosts in seen["db"] if t < gone[0]), seen
        t_db, db_host = first_running(seen["db"], gone[0])
        assert gone[0] - t_cut < 7.0, (seen, agents.events(), agents.logs())
        assert db_host != "h2"
        print(f"partition: db fenced {gone[0] - t_cut:.1f}s after the cut, "
              f"started on {db_host} {t_db - t_cut:.1f}s after it")
        deadline = time.monotonic() + 10  # the leader writes the event after the start
        events = agents.events()
        while not any(e["kind"] == "started" and e["vm"] == app for e in events):
            assert time.monotonic() < deadline, events
            time.sleep(0.3)
            events = agents.events()
        ready = [e for e in events if e["kind"] == "ready" and e["vm"] == db]
        started_app = [e for e in events if e["kind"] == "started" and e["vm"] == app]
        assert ready and started_app, events
        assert started_app[0]["time"] >= ready[0]["time"] + READY_DELAY, events
        assert any(e["kind"] == "detected" and e["host"] == "h2" for e in events)
        guests["db"].wait_writer(above=seq_before, timeout=60)  # it writes on, elsewhere
        h2.heal()
        time.sleep(3)  # h2's agent renews again and reports its fencing
        assert any(e["kind"] == "self-fenced" and e["host"] == "h2"
                   for e in agents.events()), agents.logs()
        assert running_on(cluster, guests["db"]) != ["h2"]

        # 2. kill -9 the host running db (h1 leads, db prefers h1)
        victim = cluster.host(running_on(cluster, guests["db"])[0])
        leader_was = agents.leader()
        # db prefers h1, the leader's host: the kill takes the leader with it ("Done
        # when": killing the leader's host still fails its VMs over)
        assert victim.name == leader_was == "h1", (victim.name, leader_was)
        t_kill = time.monotonic()
        victim.kill()
        seen = watch(cluster, {"db": guests["db"]},
                     lambda: bool(running_on(cluster, guests["db"])), 60,
                     "failover after the kill", agents)
        t_start, host = first_running(seen["db"], t_kill)
        print(f"kill -9 {victim.name} (leader: {leader_was}): db started on {host} "
              f"{t_start - t_kill:.1f}s after the kill")
        assert host != victim.name
        assert t_start - t_kill <= 20.0, agents.logs()
        guests["db"].wait_heartbeat(120)
        agents.stop()  # no leader may restart what the test now stops
        for g in guests.values():
            for name in running_on(cluster, g):
                g.destroy(cluster.host(name))
        rc = check_records(guests["db"].data_disk, "qcow2")
        assert rc.consistent and rc.last_seq > seq_before, rc.problems
    finally:
        agents.stop()
