"""The leader over repeated and overlapping host failures (FakeFleet + in-memory store):
the partition bench's stalls and boot-order misses. Each agent keeps its own libvirt
connections; a partition closes the connections to and from a cut host (libvirt's
keepalive), so the next leader's first start there fails once."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tests.unit.test_ha_leader import HOSTS, live, running, setup, xml
from vmdr.agent.ha_runtime import LibvirtOps
from vmdr.ha.leader import START_ATTEMPTS, HALeader, LiveHost
from vmdr.ha.model import HAVM, Readiness
from vmdr.ha.store import HAStore
from vmdr.hypervisor.fake import FakeFleet


def uri(h: str) -> str:
    return f"fake://{h}/system"


def place(fleet: FakeFleet, store: HAStore, vm: str, host: str) -> None:
    for h in fleet.hosts.values():
        h.domains.pop(vm, None)
    fleet.host(uri(host)).add_domain(xml(vm), active=True)
    fleet.hosts[uri(host)].domains[vm].agent = True
    store.put_domain(vm, xml(vm), host)


def kinds(store: HAStore, since: float = 0.0) -> list[tuple[str, str | None]]:
    return [(e.kind, e.vm) for e in store.events() if e.time >= since]


class Refusing:
    """FleetOps whose first *times* starts of one VM fail (its target's libvirt refuses,
    e.g. a connection that keeps failing after the hosts were cut off)."""

    def __init__(self, ops: LibvirtOps, vm: str, times: int = 1000) -> None:
        self.ops, self.vm, self.times, self.tries = ops, vm, times, 0

    def where_running(self, vm: str) -> list[str]:
        return self.ops.where_running(vm)

    def start(self, host: str, xml_: str) -> None:
        if f"<name>{self.vm}</name>" in xml_:
            self.tries += 1
            if self.tries <= self.times:
                raise RuntimeError("internal error: client socket is closed")
        self.ops.start(host, xml_)

    def ready(self, host: str, vm: str, check: str) -> bool:
        return self.ops.ready(host, vm, check)


def test_failed_start_neither_strands_nor_releases_the_waiters() -> None:
    """db's first start on h1 fails: it is tried again after START_RETRY_S (libvirt
    re-checked first), and app still waits for db's readiness (before: db gave up at once,
    released app, and was restarted untracked, or never while another failover ran)."""
    fleet, ops, store, policy = setup(ready_delay=1.0)
    for vm in ("db", "app"):
        place(fleet, store, vm, "h2")
    leader = HALeader(policy, store, Refusing(ops, "db", times=1), "h3")
    fleet.hosts[uri("h2")].up = False
    big = {"h1": LiveHost("h1", 8, 16384), "h3": LiveHost("h3", 8, 8192)}  # h1 first
    leader.step(10.0, big, set(HOSTS))
    leader.step(12.0, big, set(HOSTS))  # fence delay over: start fails
    assert running(fleet, "db") == [] and running(fleet, "app") == []
    rec = store.failover("h2")
    assert rec is not None and rec["failed"] == {} and rec["start_errors"]["db"]["n"] == 1
    leader.step(12.5, big, set(HOSTS))  # not before START_RETRY_S
    assert running(fleet, "db") == []
    leader.step(13.0, big, set(HOSTS))
    (db_at,) = running(fleet, "db")
    assert running(fleet, "app") == []
    fleet.hosts[db_at].domains["db"].agent = True
    for t in (13.5, 14.0, 14.25):
        leader.step(t, big, set(HOSTS))
        assert running(fleet, "app") == []  # db ready at 13.5 + 1 s
    leader.step(14.5, big, set(HOSTS))
    (app_at,) = running(fleet, "app")
    fleet.hosts[app_at].domains["app"].agent = True
    leader.step(15.0, big, set(HOSTS))
    rec = store.failover("h2")
    assert rec is not None and rec["done"] and set(rec["ready"]) == {"db", "app"}
    assert ("gave-up", "db") not in kinds(store)


def test_start_that_keeps_failing_while_another_failover_is_in_flight() -> None:
    """db and app on h1, web (group 3) on h3; both hosts fail. db's start fails every
    time: after START_ATTEMPTS it gives up, app goes on, web after app — the leader never
    stops on it (before: the order across both records lost db and every poll raised)."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    policy = replace(policy, vms={**policy.vms, "web": HAVM(
        "web", 3, ready=Readiness("agent", 0.0, 60.0))})
    place(fleet, store, "web", "h3")
    refusing = Refusing(ops, "db")  # every time
    leader = HALeader(policy, store, refusing, "h2")
    fleet.hosts[uri("h1")].up = fleet.hosts[uri("h3")].up = False
    leader.step(1.0, live("h2"), set(HOSTS))
    t = 3.0
    while t < 10.0:
        leader.step(t, live("h2"), set(HOSTS))
        for vm in ("app", "web"):
            for u in running(fleet, vm):
                fleet.hosts[u].domains[vm].agent = True
        t += 0.25
    assert refusing.tries == START_ATTEMPTS
    assert running(fleet, "db") == []
    assert running(fleet, "app") == [uri("h2")] and running(fleet, "web") == [uri("h2")]
    k = kinds(store)
    assert k.index(("gave-up", "db")) < k.index(("started", "app")) \
        < k.index(("ready", "app")) < k.index(("started", "web"))
    assert all(r["done"] for r in store.failovers().values())


def test_host_fails_rejoins_and_fails_again() -> None:
    """The same host fails twice: its finished record is dropped when it rejoins, the
    second failure is a new failover with its own plan and the same order."""
    fleet, ops, store, policy = setup(ready_delay=1.0)
    leader = HALeader(policy, store, ops, "h2")
    t = 0.0
    for round_ in range(2):
        for vm in ("db", "app"):
            place(fleet, store, vm, "h1")
        leader.step(t, live(*HOSTS), set(HOSTS))
        assert "h1" not in store.failovers()
        fleet.hosts[uri("h1")].up = False
        t0 = t = t + 1.0
        while not store.failover("h1") or not store.failover("h1")["done"]:  # type: ignore[index]
            leader.step(t, live("h2", "h3"), set(HOSTS))
            for vm in ("db", "app"):
                for u in running(fleet, vm):
                    fleet.hosts[u].domains[vm].agent = True
            t += 0.25
            assert t < t0 + 30, round_
        evs = [e for e in store.events() if e.time >= t0]
        ready_db = next(e.time for e in evs if e.kind == "ready" and e.vm == "db")
        start_app = next(e.time for e in evs if e.kind == "started" and e.vm == "app")
        assert start_app >= ready_db + 1.0
        fleet.hosts[uri("h1")].up = True  # rejoins, empty
        fleet.hosts[uri("h1")].domains.clear()
        leader.step(t, live(*HOSTS), set(HOSTS))
        assert store.failovers() == {}
    assert [k for k in kinds(store) if k[0] == "detected"] == [("detected", None)] * 2


def test_a_new_leader_term_forgets_the_hosts_it_noted() -> None:
    """h2 led while h1 was down (nothing to restart there), then stopped leading; h1
    rejoined, got db, and failed again before h2 led again: h2 must see it as gone."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    for vm in ("db", "app"):
        place(fleet, store, vm, "h3")
    leader = HALeader(policy, store, ops, "h2")
    fleet.hosts[uri("h1")].up = False
    leader.step(1.0, live("h2", "h3"), set(HOSTS))  # h1 gone, no HA VM there
    assert store.failovers() == {}
    # h2 does not lead for a minute; h1 rejoins, db moves there, h1 fails again
    fleet.hosts[uri("h1")].up = True
    place(fleet, store, "db", "h1")
    fleet.hosts[uri("h1")].up = False
    leader.step(60.0, live("h2", "h3"), set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None
    leader.step(62.0, live("h2", "h3"), set(HOSTS))
    assert len(running(fleet, "db")) == 1


def _trials(seed: int, trials: int) -> list[tuple[int, list[str], bool, bool]]:
    """The partition bench on FakeFleet: each trial cuts the host(s) running db and app
    (db prefers h1), they fence themselves after 3.5 s, their leases expire after 5-6 s
    (the leader then changes if it was cut), and they rejoin once both run elsewhere.
    Every agent has its own LibvirtOps; a cut closes the connections to and from it."""
    rnd = random.Random(seed)
    fleet, ops, store, policy = setup(ready_delay=1.0)
    policy = replace(policy, vms={**policy.vms, "db": replace(
        policy.vms["db"], affinity_hosts=("h1",), hosts_rule="should")})
    allops = {h: LibvirtOps(dict(ops.uris), fleet.connect) for h in HOSTS}
    leaders = {h: HALeader(policy, store, allops[h], h) for h in HOSTS}
    for vm in ("db", "app"):
        place(fleet, store, vm, "h2")
    boots: dict[tuple[str, str], float] = {}
    clock = {"t": 100.0}
    lead: dict[str, str | None] = {"h": "h1"}

    def tick(members: list[str] | tuple[str, ...], agents: list[str]) -> None:
        t = clock["t"]
        for (u, vm), at in list(boots.items()):
            d = fleet.hosts[u].domains.get(vm)
            if d is not None and d.active and t >= at:
                d.agent = True
        for u, h in fleet.hosts.items():
            for vm, d in h.domains.items():
                if d.active and not d.agent and (u, vm) not in boots:
                    boots[(u, vm)] = t + rnd.uniform(2, 15)  # guest boot time
        if lead["h"] not in members:
            cands = [h for h in agents if h in members]
            lead["h"] = rnd.choice(cands) if cands else None
        if lead["h"] in agents:
            leaders[lead["h"]].step(t, live(*members), set(HOSTS))
        for vm in ("db", "app"):
            assert len(running(fleet, vm)) <= 1, "two running copies"
        clock["t"] = t + 0.25

    bad = []
    for trial in range(trials):
        cut = sorted({running(fleet, vm)[0].split("/")[2] for vm in ("db", "app")})
        up = [h for h in HOSTS if h not in cut]
        t_cut, lease = clock["t"], rnd.uniform(5.0, 6.0)
        while clock["t"] - t_cut < 120:
            if clock["t"] - t_cut >= 3.5:  # self-fenced; its libvirt unreachable
                for h in cut:
                    fleet.hosts[uri(h)].domains.clear()
                    fleet.hosts[uri(h)].up = False
                    boots = {k: v for k, v in boots.items() if k[0] != uri(h)}
                    for a, o in allops.items():
                        for peer, c in list(o._conns.items()):
                            if a != peer and h in (a, peer):
                                c.close()
            if lead["h"] in cut and clock["t"] - t_cut >= lease:
                lead["h"] = None
            tick(HOSTS if clock["t"] - t_cut < lease else up, up)
            where = {vm: running(fleet, vm) for vm in ("db", "app")}
            if all(w and w[0].split("/")[2] not in cut for w in where.values()):
                break
        in_time = clock["t"] - t_cut < 120
        for _ in range(40):
            tick(up, up)
        evs = [e for e in store.events() if e.time >= t_cut]
        rd = [e.time for e in evs if e.kind == "ready" and e.vm == "db"]
        sa = [e.time for e in evs if e.kind == "started" and e.vm == "app"]
        order = bool(rd and sa and sa[0] >= rd[0] + 1.0)
        if not (in_time and order):
            bad.append((trial, cut, in_time, order))
        for h in cut:  # heal: rejoins empty
            fleet.hosts[uri(h)].up = True
        for _ in range(8):
            tick(HOSTS, list(HOSTS))
    return bad


@pytest.mark.parametrize("seed", [1, 6, 10, 16])
def test_partition_trials_keep_order_and_time(seed: int) -> None:
    assert _trials(seed, 9) == []
