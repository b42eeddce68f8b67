"""The HA decision core driving a real failover on the harness: a host with two HA guests
is killed; ``failover_plan`` places them on the survivors (capacity from libvirt,
anti-affinity) and ``due`` releases the dependent guest only after its dependency's
heartbeat plus its ready delay. Slow (two TCG boots after the kill): VMDR_SLOW=1.
"""

from __future__ import annotations

import time

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.guests import Guest
from vmdr.ha.boot import due
from vmdr.ha.failover import failover_plan
from vmdr.ha.model import HAVM, ClusterState, HAPolicy, HostState, Readiness, VMState
from vmdr.ha.settings import HASettings

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.slow]


def live_state(cluster: Cluster, guests: dict[str, Guest]) -> ClusterState:
    """Hosts and guests as their libvirtds report them (a dead host is down)."""
    hosts, vms = {}, {}
    for h in cluster.hosts:
        if not h.alive():
            hosts[h.name] = HostState(h.name, None, None, up=False)
            continue
        _model, mem_mib, cpus, *_ = h.conn().getInfo()
        hosts[h.name] = HostState(h.name, cpus, mem_mib << 20)
        for name, g in guests.items():
            if g.is_running_on(h):
                info = g.domain(h).info()  # state, max memory KiB, memory, vcpus, cpu time
                vms[name] = VMState(name, h.name, info[3], info[1] << 10)
    for name, g in guests.items():
        if name not in vms:
            vms[name] = VMState(name, g.host.name if g.host else None, 1, 128 << 20,
                                running=False)
    return ClusterState(hosts, vms)


def test_failover_by_plan_with_readiness(mh_cluster: Cluster) -> None:
    h1 = mh_cluster.hosts[0]
    guests = {"db": mh_cluster.new_guest(writer_rate=0),
              "app": mh_cluster.new_guest(writer_rate=0)}
    policy = HAPolicy(
        HASettings(),
        {"db": HAVM("db", 1, ready=Readiness("agent", 2.0, 120.0)),
         "app": HAVM("app", 2, ("db",), ready=Readiness("agent", 0.0, 120.0))},
        {h.name: None for h in mh_cluster.hosts},
        groups={"db": "tier", "app": "tier"})  # anti-affinity: never on one host
    for g in guests.values():
        g.start(h1)
    for g in guests.values():
        g.wait_heartbeat(120)
    before = live_state(mh_cluster, guests)
    assert before.vms["db"].running and before.vms["db"].host == "h1"

    h1.kill()
    assert live_state(mh_cluster, guests).hosts["h1"].up is False
    # the leader decides on its last known state: what ran on the host that failed
    plan = failover_plan(policy, before, {"h1"})
    assert plan.ok, plan.placement.unplaced
    hosts = {s.vm: s.host for s in plan.starts}
    assert set(hosts.values()) == {"h2", "h3"}  # apart, and not on the dead host

    started: dict[str, float] = {}
    ready_at: dict[str, float] = {}
    deadline = time.monotonic() + 180
    while len(ready_at) < len(plan.starts):
        assert time.monotonic() < deadline, f"failover incomplete: {started} {ready_at}"
        now = time.monotonic()
        for s in due(plan.starts, now=now, started=started, ready_at=ready_at):
            guests[s.vm].start(mh_cluster.host(s.host))
            started[s.vm] = time.monotonic()
        for vm in started:
            if vm not in ready_at and guests[vm].heartbeats():
                ready_at[vm] = time.monotonic()
        time.sleep(0.1)
    # the dependent guest started only after db's heartbeat plus db's 2 s ready delay
    assert started["app"] >= ready_at["db"] + 2.0
    for vm, host in hosts.items():
        assert guests[vm].is_running_on(mh_cluster.host(host))
