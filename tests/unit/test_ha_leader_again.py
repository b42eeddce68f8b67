"""A host that fails again while its first failover is still in flight (a VM waiting for
room, up to UNPLACED_GIVE_UP_S): the second failure must be detected and handled, not
hidden behind the record of the first (FakeFleet + in-memory store)."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_ha_leader import HOSTS, running, setup, xml
from vmdr.ha.leader import HALeader, LiveHost
from vmdr.ha.model import HAVM, Readiness

H1 = "fake://h1/system"


def test_second_failure_of_a_host_whose_failover_waits_for_room() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    policy = replace(policy, vms={**policy.vms, "web": HAVM(
        "web", 3, ready=Readiness("agent", 0.0, 60.0))})
    leader = HALeader(policy, store, ops, "h2")
    small = {"h2": LiveHost("h2", 8, 300), "h3": LiveHost("h3", 8, 100)}  # room for db only

    def poll(t: float, live: dict[str, LiveHost]) -> None:
        leader.step(t, live, set(HOSTS))
        for vm in ("db", "app", "web"):
            for u in running(fleet, vm):
                fleet.hosts[u].domains[vm].agent = True
            assert len(running(fleet, vm)) <= 1, vm

    # 1. h1 fails: db restarts on h2, app fits nowhere and waits for room
    fleet.hosts[H1].up = False
    t = 1.0
    while t < 8.0:
        poll(t, small)
        t += 0.25
    assert running(fleet, "db") == ["fake://h2/system"] and running(fleet, "app") == []
    rec = store.failover("h1")
    assert rec is not None and not rec["done"]
    assert [u["vm"] for u in rec["plan"]["unplaced"]] == ["app"]

    # 2. h1 comes back (empty) and gets a new HA VM, web; app still waits (too big)
    fleet.hosts[H1].up = True
    fleet.hosts[H1].domains.clear()
    fleet.host(H1).add_domain(xml("web"), active=True)
    store.put_domain("web", xml("web"), "h1", now=t)
    back = {**small, "h1": LiveHost("h1", 8, 300, ("web",))}
    while t < 12.0:
        poll(t, back)
        t += 0.25
    assert running(fleet, "web") == [H1] and running(fleet, "app") == []

    # 3. h1 fails again; h3 has room now
    fleet.hosts[H1].up = False
    t_again = t
    roomy = {"h2": LiveHost("h2", 8, 300), "h3": LiveHost("h3", 8, 2048)}
    while t < t_again + 15.0:
        poll(t, roomy)
        t += 0.25
    assert running(fleet, "web") == ["fake://h3/system"], store.events()
    assert running(fleet, "app") == ["fake://h3/system"]
    detected = [e for e in store.events() if e.kind == "detected" and e.host == "h1"
                and e.time >= t_again]
    assert detected and "web" in detected[0].reason, [e.reason for e in store.events()]
    rec = store.failover("h1")
    assert rec is not None and rec["done"] and {"db", "app", "web"} <= set(rec["ready"])
    assert len(rec["failures"]) == 2 and "back" not in rec
    assert len([e for e in store.events() if e.kind == "fenced" and e.host == "h1"]) == 2
    web_started = next(e.time for e in store.events() if e.kind == "started"
                       and e.vm == "web")
    assert web_started >= t_again + policy.settings.fence_delay  # after the fence delay
