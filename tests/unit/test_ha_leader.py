"""The leader's failover executor over FakeFleet and an in-memory store: detection, fence
delay, placement with maintenance, boot order with readiness, the libvirt re-check before
every start, and a new leader resuming an in-flight failover."""

from __future__ import annotations

from vmdr.agent.ha_runtime import LibvirtOps
from vmdr.ha.leader import UNPLACED_GIVE_UP_S, HALeader, LiveHost, domain_size
from vmdr.ha.model import HAVM, HAPolicy, Readiness
from vmdr.ha.settings import HASettings
from vmdr.ha.store import HAStore, MemoryKV
from vmdr.hypervisor.fake import FakeFleet

HOSTS = ("h1", "h2", "h3")


def xml(name: str, mem_mib: int = 256) -> str:
    return (f"<domain type='kvm'><name>{name}</name><memory unit='KiB'>{mem_mib * 1024}"
            f"</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices/></domain>")


def setup(ready_delay: float = 2.0) -> tuple[FakeFleet, LibvirtOps, HAStore, HAPolicy]:
    fleet = FakeFleet()
    uris = {h: f"fake://{h}/system" for h in HOSTS}
    for u in uris.values():
        fleet.host(u)
    policy = HAPolicy(
        HASettings(),
        {"db": HAVM("db", 1, ready=Readiness("agent", ready_delay, 60.0)),
         "app": HAVM("app", 2, ("db",), ready=Readiness("agent", 0.0, 60.0))},
        dict.fromkeys(HOSTS))
    store = HAStore(MemoryKV(), "/vmdr/", me="h2")
    for vm in ("db", "app"):
        fleet.host(uris["h1"]).add_domain(xml(vm), active=True)
        store.put_domain(vm, xml(vm), "h1", now=0.0)
    fleet.host(uris["h1"]).add_domain(xml("scratch"), active=True)  # not under HA
    return fleet, LibvirtOps(uris, fleet.connect), store, policy


def live(*names: str) -> dict[str, LiveHost]:
    return {n: LiveHost(n, 8, 8192) for n in names}


def running(fleet: FakeFleet, vm: str) -> list[str]:
    return sorted(u for u, h in fleet.hosts.items()
                  if h.up and vm in h.domains and h.domains[vm].active)


def test_domain_size() -> None:
    assert domain_size(xml("x", 512)) == (1, 512 << 20)
    assert domain_size("<domain") == (0, 0)
    assert domain_size("<!DOCTYPE x><domain/>") == (0, 0)


def test_failover_by_priority_with_readiness() -> None:
    fleet, ops, store, policy = setup()
    leader = HALeader(policy, store, ops, "h2")
    leader.step(100.0, live(*HOSTS), set(HOSTS))
    assert store.failovers() == {}
    fleet.hosts["fake://h1/system"].up = False  # kill -9: its libvirt is gone
    leader.step(101.0, live("h2", "h3"), set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None and rec["fence_until"] == 103.0 and rec["plan"] is None
    leader.step(102.9, live("h2", "h3"), set(HOSTS))  # within the fence delay: nothing
    assert running(fleet, "db") == []
    leader.step(103.0, live("h2", "h3"), set(HOSTS))
    (db_at,) = running(fleet, "db")
    assert running(fleet, "app") == []  # group 2 waits for db's heartbeat + 2 s
    assert running(fleet, "scratch") == []  # not under HA: never restarted
    fleet.hosts[db_at].domains["db"].agent = True
    leader.step(104.0, live("h2", "h3"), set(HOSTS))  # db ready at 104
    leader.step(105.9, live("h2", "h3"), set(HOSTS))
    assert running(fleet, "app") == []
    leader.step(106.0, live("h2", "h3"), set(HOSTS))
    assert len(running(fleet, "app")) == 1
    kinds = [(e.kind, e.vm) for e in store.events()]
    assert kinds[:2] == [("detected", None), ("fenced", None)]
    assert ("started", "db") in kinds and ("ready", "db") in kinds
    assert kinds.index(("ready", "db")) < kinds.index(("started", "app"))
    app_host = running(fleet, "app")[0].split("/")[2]
    fleet.hosts[running(fleet, "app")[0]].domains["app"].agent = True
    leader.step(107.0, live("h2", "h3"), set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None and rec["done"]
    assert store.where("app") == app_host
    t = store.test("db")
    assert t is not None and t["kind"] == "real" and t["from"] == "h1"
    assert t["start_s"] == 2.0 and t["ready_s"] == 3.0
    # the host comes back: its finished failover record is dropped, nothing restarts
    leader.step(200.0, live(*HOSTS), set(HOSTS))
    assert store.failovers() == {}


def test_maintenance_host_is_no_target() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    store.set_maintenance("h3", "firmware")
    leader = HALeader(policy, store, ops, "h2")
    fleet.hosts["fake://h1/system"].up = False
    leader.step(1.0, live("h2", "h3"), set(HOSTS))
    leader.step(3.0, live("h2", "h3"), set(HOSTS))
    assert running(fleet, "db") == ["fake://h2/system"]


def test_new_leader_resumes_and_never_starts_twice() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    old = HALeader(policy, store, ops, "h2")
    fleet.hosts["fake://h1/system"].up = False
    old.step(10.0, live("h2", "h3"), set(HOSTS))
    old.step(12.0, live("h2", "h3"), set(HOSTS))
    (db_at,) = running(fleet, "db")
    # the old leader died right after starting db, before recording it
    rec = store.failover("h1")
    assert rec is not None
    rec["started"].clear()
    store.put_failover("h1", rec)
    new = HALeader(policy, store, ops, "h3")
    new.step(13.0, live("h3", "h2"), set(HOSTS))
    assert running(fleet, "db") == [db_at]  # re-checked: running, so not started again
    assert any(e.kind == "gave-up" and "running on" in e.reason for e in store.events())
    fleet.hosts[db_at].domains["db"].agent = True
    new.step(14.0, live("h3", "h2"), set(HOSTS))
    new.step(14.5, live("h3", "h2"), set(HOSTS))
    assert len(running(fleet, "app")) == 1
    assert all(len(running(fleet, vm)) <= 1 for vm in ("db", "app"))


def test_new_leader_finishes_the_old_leaders_own_host() -> None:
    """h2 led and died: h3 (which saw h2 as a member) detects it and restarts its VMs."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    for vm in ("db", "app"):
        fleet.hosts["fake://h1/system"].domains.pop(vm)
        fleet.host("fake://h2/system").add_domain(xml(vm), active=True)
        store.put_where(vm, "h2")
    fleet.hosts["fake://h2/system"].up = False
    new = HALeader(policy, store, ops, "h3")
    new.step(1.0, live("h1", "h3"), set(HOSTS))
    new.step(3.0, live("h1", "h3"), set(HOSTS))
    assert len(running(fleet, "db")) == 1


def test_unplaceable_vm_gives_up_with_reason() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    leader = HALeader(policy, store, ops, "h2")
    fleet.hosts["fake://h1/system"].up = False
    small = {n: LiveHost(n, 1, 128) for n in ("h2", "h3")}
    leader.step(1.0, small, set(HOSTS))
    leader.step(3.0, small, set(HOSTS))
    gave = [e for e in store.events() if e.kind == "gave-up"]
    assert {e.vm for e in gave} == {"db", "app"} and all("placed" in e.reason for e in gave)
    rec = store.failover("h1")
    assert rec is not None and not rec["done"]  # placed again while hosts (re)join
    leader.step(3.0 + UNPLACED_GIVE_UP_S, small, set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None and rec["done"] and running(fleet, "db") == []
    assert [e.vm for e in store.events() if "still cannot be placed" in e.reason] == \
        ["app", "db"]


def test_started_on_a_host_that_fails_too() -> None:
    """db restarted on h2, which fails before db is ready (h2 led, or was cut): the
    record of h1 does not wait on h2's libvirt; h2's own failover restarts db on h3."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    leader = HALeader(policy, store, ops, "h3")
    fleet.hosts["fake://h1/system"].up = False
    leader.step(1.0, live("h2", "h3"), set(HOSTS))
    leader.step(3.0, live("h2", "h3"), set(HOSTS))
    (db_at,) = running(fleet, "db")
    assert db_at == "fake://h2/system"  # equal free memory: the first name
    fleet.hosts[db_at].domains.clear()
    fleet.hosts[db_at].up = False  # h2 dies with db booting there
    leader.step(4.0, live("h3"), set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None and "db" in rec["failed"]
    leader.step(6.0, live("h3"), set(HOSTS))
    assert running(fleet, "db") == ["fake://h3/system"]


def test_order_holds_across_hosts_that_fail_together() -> None:
    """db on h1 and app (depends on db, later group) on h3 fail together: two failover
    records, one order — app starts only after db is ready, even when h3's record is
    planned first."""
    fleet, ops, store, policy = setup(ready_delay=1.0)
    fleet.hosts["fake://h1/system"].domains.pop("app")
    fleet.host("fake://h3/system").add_domain(xml("app"), active=True)
    store.put_where("app", "h3")
    leader = HALeader(policy, store, ops, "h2")
    fleet.hosts["fake://h3/system"].up = False
    leader.step(1.0, live("h1", "h2"), set(HOSTS))  # h3 first: app's record is older
    fleet.hosts["fake://h1/system"].up = False
    leader.step(2.0, live("h2"), set(HOSTS))
    leader.step(3.0, live("h2"), set(HOSTS))  # h3's fence delay is over: app would go now
    assert running(fleet, "app") == []  # but db (h1, still in its fence delay) comes first
    leader.step(4.0, live("h2"), set(HOSTS))
    assert running(fleet, "db") == ["fake://h2/system"] and running(fleet, "app") == []
    fleet.hosts["fake://h2/system"].domains["db"].agent = True
    leader.step(5.0, live("h2"), set(HOSTS))  # db ready at 5
    leader.step(5.5, live("h2"), set(HOSTS))
    assert running(fleet, "app") == []  # + its 1 s delay
    leader.step(6.0, live("h2"), set(HOSTS))
    assert running(fleet, "app") == ["fake://h2/system"]
