"""The leader after an etcd hiccup (bench/ha_tradeoff.py's finding), on FakeFleet.

With etcd out of quorum for longer than the self-fence time, the failed host's libvirt
still answers and its HA VM may still run when the leader gets to it: the host is
destroying it (self-fence) a moment late. The leader must not start a second copy — and
must not take the doomed copy for a restart either: once it is gone, the VM starts on its
planned target.
"""

from __future__ import annotations

from tests.unit.test_ha_leader import HOSTS, live, running, setup
from vmdr.ha.leader import HALeader, LiveHost

H1 = "fake://h1/system"


def test_vm_found_running_on_the_failed_host_then_fenced_is_restarted() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    leader = HALeader(policy, store, ops, "h2")
    leader.step(1.0, live("h2", "h3"), set(HOSTS))  # h1's member key is gone
    leader.step(3.0, live("h2", "h3"), set(HOSTS))  # fence delay over; db still on h1
    assert running(fleet, "db") == [H1]  # never two copies
    fleet.hosts[H1].domains["db"].state = "stopped"  # h1's self-fence, late
    fleet.hosts[H1].domains["app"].state = "stopped"
    t = 3.25
    while t < 8.0:
        leader.step(t, live("h2", "h3"), set(HOSTS))
        for vm in ("db", "app"):
            for u in running(fleet, vm):
                fleet.hosts[u].domains[vm].agent = True
            assert len(running(fleet, vm)) <= 1
        t += 0.25
    assert running(fleet, "db") and running(fleet, "db") != [H1]
    assert running(fleet, "app") and running(fleet, "app") != [H1]
    rec = store.failover("h1")
    assert rec is not None and rec["done"] and set(rec["ready"]) == {"db", "app"}
    kinds = [(e.kind, e.vm) for e in store.events()]
    assert kinds.index(("ready", "db")) < kinds.index(("started", "app"))


def test_vm_found_running_on_the_failed_host_that_stays_is_left_there() -> None:
    """The failed host's agent died but its libvirt and VMs are fine: the VMs are found
    running there, answer, and are left alone (no second copy, no restart)."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    for vm in ("db", "app"):
        fleet.hosts[H1].domains[vm].agent = True
    leader = HALeader(policy, store, ops, "h2")
    for t in (1.0, 3.0, 3.25, 3.5, 4.0, 5.0, 8.0):
        leader.step(t, live("h2", "h3"), set(HOSTS))
    assert running(fleet, "db") == [H1] and running(fleet, "app") == [H1]
    rec = store.failover("h1")
    assert rec is not None and rec["done"]


def test_vm_that_fits_nowhere_yet_is_placed_when_a_host_joins() -> None:
    """After an etcd outage every lease came back one by one: when h1's self-report is
    handled, the only member key back is a host too small. The VMs are placed again
    once h3's member key is back — they used to be given up for good."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    leader = HALeader(policy, store, ops, "h2")
    fleet.hosts[H1].domains["db"].state = "stopped"  # h1 fenced itself
    fleet.hosts[H1].domains["app"].state = "stopped"
    small = {"h2": LiveHost("h2", 1, 200)}  # too small for db
    leader.step(1.0, small, set(HOSTS))
    leader.step(3.0, small, set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None and "db" in [u["vm"] for u in rec["plan"]["unplaced"]]
    assert running(fleet, "app") == []  # group 2 waits for db, which is not placed yet
    back = {**small, "h3": LiveHost("h3", 8, 8192)}
    t = 4.0
    while t < 12.0:
        leader.step(t, back, set(HOSTS))
        for vm in ("db", "app"):
            for u in running(fleet, vm):
                fleet.hosts[u].domains[vm].agent = True
        t += 0.25
    assert running(fleet, "db") == ["fake://h3/system"]
    assert len(running(fleet, "app")) == 1
    rec = store.failover("h1")
    assert rec is not None and rec["done"] and set(rec["ready"]) == {"db", "app"}
    kinds = [(e.kind, e.vm) for e in store.events()]
    assert kinds.index(("ready", "db")) < kinds.index(("started", "app"))
