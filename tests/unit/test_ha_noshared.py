"""HA without shared storage (vmdr.ha.noshared, the leader's restore orders and the target's
executor) over FakeFleet and an in-memory store: which restore point, the data lost,
no restore point → gave-up, an order never run twice nor late, and crash-resume."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmdr.agent.ha_replica import ReplicaUnusable
from vmdr.agent.ha_restore import NoRestorePoint, RestoreExecutor
from vmdr.agent.ha_runtime import LibvirtOps
from vmdr.config import Config, RepositoryRef
from vmdr.ha.leader import HALeader, LiveHost
from vmdr.ha.model import HAVM, HAPolicy, Readiness
from vmdr.ha.noshared import (
    ORDER_CLAIM_S,
    RestorePoint,
    choose,
    describe,
    fmt_span,
    lost_s,
    order_id,
    with_replica_affinity,
)
from vmdr.ha.settings import HASettings
from vmdr.ha.store import HAStore, MemoryKV
from vmdr.hypervisor.fake import FakeFleet

HOSTS = ("h1", "h2", "h3")
T0 = dt.datetime(2026, 12, 6, 7, 45, 22, tzinfo=dt.UTC).timestamp()  # detection
SNAP = RestorePoint("snapshot", "3f2a1b2c" + "0" * 56, T0 - 252, "main")  # 07:41:10


def xml(name: str) -> str:
    return (f"<domain type='kvm'><name>{name}</name><memory unit='KiB'>262144</memory>"
            "<vcpu>1</vcpu><os><type>hvm</type></os><devices/></domain>")


def test_rpo_arithmetic_and_wording() -> None:
    assert lost_s(T0, SNAP) == 252.0
    assert lost_s(SNAP.time - 5, SNAP) == 0.0  # a point after the failure loses nothing
    assert [fmt_span(s) for s in (12, 252, 7380, 93600)] == \
        ["12 s", "4 min 12 s", "2 h 3 min", "1 d 2 h"]
    assert describe(SNAP, T0) == ("snapshot 3f2a1b2c of 07:41:10 (instant restore; lost ≤ "
                                  "4 min 12 s of writes)")
    old = RestorePoint("replica", "p-20261205", T0 - 86400 - 60, "h3")
    assert describe(old, T0) == ("replica point p-20261205 on h3 of 2026-12-05 07:44:22 "
                                 "(replica standby; lost ≤ 1 d 0 h of writes)")


def test_choose_prefers_the_replica_on_its_host_then_the_backup() -> None:
    rule = HAVM("db", 1, storage="local", repository="main", replica_host="h3")
    rep = RestorePoint("replica", "p1", T0 - 30, "h3")
    assert choose(rule, "h3", rep, SNAP) == (rep, "")
    assert choose(rule, "h2", rep, SNAP) == (SNAP, "")  # placed elsewhere: the backup
    assert choose(rule, "h3", None, SNAP) == (SNAP, "")
    p, why = choose(rule, "h2", rep, None)
    assert p is None and why == ("no restore point: its replica is on h3, not h2; no backup "
                                 "of it in repository main")
    p, why = choose(HAVM("db", 1, storage="local"), "h2", None, None)
    assert p is None and "no replica declared" in why and "ha_repository" in why


def test_replica_host_is_a_should_preference() -> None:
    pol = HAPolicy(HASettings(), {
        "a": HAVM("a", 1, storage="local", replica_host="h3"),
        "b": HAVM("b", 1, storage="local", replica_host="h3", affinity_hosts=("h2",)),
        "c": HAVM("c", 1, replica_host="h3")}, dict.fromkeys(HOSTS))
    vms = with_replica_affinity(pol).vms
    assert (vms["a"].affinity_hosts, vms["a"].hosts_rule) == (("h3",), "should")
    assert vms["b"].affinity_hosts == ("h2",)  # its own rule wins
    assert vms["c"].affinity_hosts == ()  # shared storage: no replica needed


def stand_in_child(*args: str) -> subprocess.Popen[bytes]:
    """A sleeping process whose command line reads ``... instant-restore ARGS``, as an HA
    restore child's does; returned once /proc shows it (the kernel fills
    /proc/PID/cmdline a moment after exec)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                          "instant-restore", *args])
    for _ in range(200):
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            if b"instant-restore" in f.read():
                break
        time.sleep(0.01)
    return p


class Cluster:
    """h1 fails; db (local disks, group 1) and app (shared, group 2, depends on db)."""

    def __init__(self, tmp: Path, *, point: RestorePoint | None = SNAP,
                 replica_host: str | None = None,
                 replica: RestorePoint | None = None) -> None:
        self.fleet = FakeFleet()
        self.uris = {h: f"fake://{h}/system" for h in HOSTS}
        for u in self.uris.values():
            self.fleet.host(u)
        self.policy = HAPolicy(HASettings(), {
            "db": HAVM("db", 1, ready=Readiness("agent", 0.0, 60.0), storage="local",
                       repository="main", replica_host=replica_host),
            "app": HAVM("app", 2, ("db",), ready=Readiness("none", 0.0, 60.0))},
            dict.fromkeys(HOSTS))
        self.kv = MemoryKV()
        self.store = HAStore(self.kv, "/vmdr/", me="h2")
        for vm in ("db", "app"):
            self.fleet.host(self.uris["h1"]).add_domain(xml(vm), active=True)
            self.store.put_domain(vm, xml(vm), "h1", now=0.0)
        self.ops = LibvirtOps(self.uris, self.fleet.connect)
        self.point = point
        self.replica = replica
        self.spawned: list[tuple[str, list[str]]] = []
        self.tmp = tmp
        self.execs = {h: self.executor(h) for h in ("h2", "h3")}

    def executor(self, h: str) -> RestoreExecutor:
        def resolve(order: dict[str, Any]) -> RestorePoint:
            if self.point is None:
                raise NoRestorePoint("no backup of db in repository main")
            return self.point

        def spawn(argv: list[str], log: str) -> Any:
            self.spawned.append((h, argv))
            self.fleet.host(self.uris[h]).add_domain(xml(argv[argv.index("--name") + 1]
                                                         if "--name" in argv else "db"),
                                                     active=True)

            class Proc:
                def poll(self) -> int | None:
                    return None
            return Proc()

        def resolve_replica(order: dict[str, Any]) -> RestorePoint:
            if self.replica is None:
                raise ReplicaUnusable("the replica on h3 has no restore point yet")
            return self.replica

        def start_replica(vm: str, point: RestorePoint) -> None:
            self.spawned.append((h, ["replica", vm, point.id]))
            self.fleet.host(self.uris[h]).add_domain(xml(vm), active=True)

        cfg = Config()
        cfg.repositories["main"] = RepositoryRef("main", "file:///srv/repo", "/etc/vmdr/pw")
        return RestoreExecutor(h, HAStore(self.kv, "/vmdr/", me=h), cfg,
                               str(self.tmp / h),
                               lambda vm: h in self.where(vm), str(self.tmp / h),
                               resolve=resolve, spawn=spawn,
                               resolve_replica=resolve_replica,
                               start_replica=start_replica)

    def where(self, vm: str) -> list[str]:
        return sorted(h for h, u in self.uris.items() if self.fleet.hosts[u].up
                      and vm in self.fleet.hosts[u].domains
                      and self.fleet.hosts[u].domains[vm].active)

    def kill_h1(self) -> None:
        self.fleet.hosts[self.uris["h1"]].up = False

    def step(self, leader: HALeader, now: float, *, agents: tuple[str, ...] = ("h2", "h3"),
             ) -> None:
        leader.step(now, {n: LiveHost(n, 8, 8192) for n in ("h2", "h3")}, set(HOSTS))
        for h in agents:
            self.execs[h].poll(now)

    def ordered(self, leader: HALeader) -> tuple[str, str]:
        """h1 fails and *leader* orders db's restore, nobody carrying it out yet: the
        order's (target host, id)."""
        self.kill_h1()
        self.step(leader, T0, agents=())
        self.step(leader, T0 + 2, agents=())
        order = self.store.restore_order("db")
        assert order is not None
        return order["host"], order["id"]

    def heartbeat(self, vm: str) -> None:
        for h in self.where(vm):
            self.fleet.hosts[self.uris[h]].domains[vm].agent = True


def test_local_vm_restarts_from_its_newest_backup(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    leader = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    c.step(leader, T0)
    c.step(leader, T0 + 2)  # fence delay over: db placed, the order written
    order = c.store.restore_order("db")
    assert order is not None and order["id"] == order_id("h1", T0) and order["from"] == "h1"
    target = order["host"]
    assert c.where("db") == [target]  # its agent claimed it and ran the instant restore
    assert len(c.spawned) == 1
    host, argv = c.spawned[0]
    assert host == target and f"db@{SNAP.id}" in argv and "instant-restore" in argv
    assert argv[argv.index("--repo") + 1] == "file:///srv/repo"
    assert argv[argv.index("--password-file") + 1] == "/etc/vmdr/pw"
    assert c.where("app") == []  # app waits for db's readiness
    c.step(leader, T0 + 2.25)  # the agent sees it running: "started"
    c.step(leader, T0 + 2.5)  # the leader reports it
    started = [e for e in c.store.events() if e.kind == "started" and e.vm == "db"]
    assert len(started) == 1
    e = started[0]
    assert e.reason.startswith(f"db on {target} from snapshot 3f2a1b2c of 07:41:10 "
                               "(instant restore; lost ≤ 4 min 12 s of writes)")
    assert e.detail["lost_s"] == 252.0 and e.detail["point"]["id"] == SNAP.id
    assert e.detail["restore"] == "snapshot"
    c.heartbeat("db")
    c.step(leader, T0 + 3)
    c.step(leader, T0 + 3.5)
    assert len(c.where("app")) == 1  # app (shared storage) from its stored XML
    c.step(leader, T0 + 4)
    rec = c.store.failover("h1")
    assert rec is not None and rec["done"] and "db" in rec["ready"]
    assert rec["restores"]["db"]["lost_s"] == 252.0
    for t in (5, 6, 7):  # nothing more: one restore, one copy
        c.step(leader, T0 + t)
    assert len(c.spawned) == 1 and len(c.where("db")) == 1


def test_no_restore_point_gives_up_with_the_reason(tmp_path: Path) -> None:
    c = Cluster(tmp_path, point=None)
    leader = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    c.step(leader, T0)
    c.step(leader, T0 + 2)
    c.step(leader, T0 + 2.5)
    gave = [e for e in c.store.events() if e.kind == "gave-up" and e.vm == "db"]
    assert len(gave) == 1 and "no restore point: no backup of db in repository main" \
        in gave[0].reason
    assert c.spawned == [] and c.where("db") == []
    c.step(leader, T0 + 3)  # its dependant goes on (missing dependency noted)
    assert len(c.where("app")) == 1
    rec = c.store.failover("h1")
    assert rec is not None and "db" in rec["failed"]


def test_an_order_nobody_takes_expires_and_is_never_run_late(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    leader = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    c.step(leader, T0, agents=())
    c.step(leader, T0 + 2, agents=())  # ordered; the target's agent is stuck
    c.step(leader, T0 + 2 + ORDER_CLAIM_S, agents=())
    gave = [e for e in c.store.events() if e.kind == "gave-up" and e.vm == "db"]
    assert len(gave) == 1 and "did not take the restore order" in gave[0].reason
    c.step(leader, T0 + 3 + ORDER_CLAIM_S)  # the agents wake up: they must not run it
    assert c.spawned == [] and c.where("db") == []


def test_new_leader_adopts_the_order_of_a_crashed_one(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    old = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    c.step(old, T0, agents=())
    c.step(old, T0 + 2, agents=())
    order = c.store.restore_order("db")
    assert order is not None
    # the old leader died right after writing the order, before its record said so
    rec = c.store.failover("h1")
    assert rec is not None
    rec["started"].pop("db")
    rec.pop("restores")
    c.store.put_failover("h1", rec)
    new = HALeader(c.policy, c.store, c.ops, "h3")
    c.step(new, T0 + 5)
    c.step(new, T0 + 5.5)
    c.step(new, T0 + 6)
    again = c.store.restore_order("db")
    assert again == order  # the same order, not a second one
    assert len(c.spawned) == 1 and len(c.where("db")) == 1
    assert [e.vm for e in c.store.events() if e.kind == "started"] == ["db"]


def test_executor_restart_resumes_or_fails_cleanly(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    target, oid = c.ordered(HALeader(c.policy, c.store, c.ops, "h2"))
    # the target claimed it, reported running, and its agent died before the child ran
    assert c.store.claim_restore("db", oid, {"by": target, "time": T0 + 2})
    c.store.put_restore_status("db", oid, {"state": "running", "time": T0 + 2,
                                           "point": SNAP.as_dict()})
    fresh = c.executor(target)  # a restarted agent: no child known
    state = tmp_path / target / "db.instant.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("{}")
    fresh.poll(T0 + 3)
    assert len(c.spawned) == 1 and "--resume" in c.spawned[0][1]
    fresh.poll(T0 + 3.5)
    st = c.store.restore_status("db", oid)
    assert st is not None and st["state"] == "started"
    # no state file and no child: failed, never a blind second start
    c2 = Cluster(tmp_path / "b")
    leader2 = HALeader(c2.policy, c2.store, c2.ops, "h2")
    c2.kill_h1()
    c2.step(leader2, T0, agents=())
    c2.step(leader2, T0 + 2, agents=())
    o2 = c2.store.restore_order("db")
    assert o2 is not None
    assert c2.store.claim_restore("db", o2["id"], {"by": o2["host"]})
    c2.store.put_restore_status("db", o2["id"], {"state": "running", "time": T0 + 2,
                                                 "point": SNAP.as_dict()})
    c2.executor(o2["host"]).poll(T0 + 3)
    st2 = c2.store.restore_status("db", o2["id"])
    assert st2 is not None and st2["state"] == "failed" and c2.spawned == []
    c2.step(leader2, T0 + 3.5, agents=())
    assert any(e.kind == "gave-up" and "process is gone" in e.reason
               for e in c2.store.events())


def _run_to_started(c: Cluster) -> dict[str, Any]:
    leader = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    for t in (0, 2, 2.25, 2.5, 2.75, 3.0):
        c.step(leader, T0 + t)
        for ex in c.execs.values():  # a replica start runs in a thread: let it finish
            for proc in ex._procs.values():
                if hasattr(proc, "_t"):
                    proc._t.join(5)
    started = [e for e in c.store.events() if e.kind == "started" and e.vm == "db"]
    assert len(started) == 1, c.store.events()
    return started[0].as_dict()


def test_replica_on_the_chosen_host_comes_first(tmp_path: Path) -> None:
    rep = RestorePoint("replica", "vmdr-20261206T074500", T0 - 22, "h3")
    c = Cluster(tmp_path, replica_host="h3", replica=rep)
    e = _run_to_started(c)
    assert e["host"] == "h3"  # placement preferred the replica's host
    assert c.spawned == [("h3", ["replica", "db", rep.id])]  # no instant restore
    assert e["reason"].startswith("db on h3 from replica point vmdr-20261206T074500 on h3 "
                                  "of 07:45:00 (replica standby; lost ≤ 22 s of writes)")
    assert e["detail"]["restore"] == "replica" and e["detail"]["lost_s"] == 22.0


def test_unusable_replica_falls_back_to_the_backup(tmp_path: Path) -> None:
    c = Cluster(tmp_path, replica_host="h3", replica=None)
    e = _run_to_started(c)
    assert e["host"] == "h3" and e["detail"]["restore"] == "snapshot"
    assert len(c.spawned) == 1 and "instant-restore" in c.spawned[0][1]
    assert e["detail"]["note"] == ("replica not used: the replica on h3 has no restore "
                                   "point yet")
    oid = order_id("h1", T0)
    st = c.store.restore_status("db", oid)
    assert st is not None and st["note"] == ("replica not used: the replica on h3 has no "
                                             "restore point yet")


def test_a_failed_replica_start_gives_up_with_its_error(tmp_path: Path) -> None:
    rep = RestorePoint("replica", "rp-1", T0 - 22, "h3")
    c = Cluster(tmp_path, replica_host="h3", replica=rep)

    def broken(vm: str, point: RestorePoint) -> None:
        raise RuntimeError("qemu-img: Could not open the replica disk")

    c.execs["h3"].start_replica = broken
    leader = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    for t in (0, 2, 2.25, 2.5, 2.75):
        c.step(leader, T0 + t)
        if t == 2:
            c.execs["h3"]._procs[order_id("h1", T0)]._t.join(5)
    gave = [e for e in c.store.events() if e.kind == "gave-up" and e.vm == "db"]
    assert len(gave) == 1 and gave[0].reason == (
        "db: not restored on h3: the start from the replica failed: qemu-img: Could not "
        "open the replica disk"), gave
    assert c.where("db") == []


def test_a_restarted_agent_adopts_the_live_child(tmp_path: Path) -> None:
    """The child of a killed agent still serves the NBD export: the new agent must not
    start a second instant restore (not even --resume) while it lives."""

    c = Cluster(tmp_path)
    target, oid = c.ordered(HALeader(c.policy, c.store, c.ops, "h2"))
    # a stand-in child whose command line is an instant restore of db
    child = stand_in_child(f"db@{SNAP.id}", "--name", "db")
    try:
        assert c.store.claim_restore("db", oid, {"by": target})
        c.store.put_restore_status("db", oid, {"state": "running", "time": T0 + 2,
                                               "point": SNAP.as_dict(), "pid": child.pid})
        state = tmp_path / target / "db.instant.json"
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text("{}")  # would invite a --resume, but the child lives
        fresh = c.executor(target)
        fresh.poll(T0 + 3)
        fresh.poll(T0 + 3.5)
        assert c.spawned == []
        st = c.store.restore_status("db", oid)
        assert st is not None and st["state"] == "running"
        c.fleet.host(c.uris[target]).add_domain(xml("db"), active=True)  # it booted
        fresh.poll(T0 + 4)
        st = c.store.restore_status("db", oid)
        assert st is not None and st["state"] == "started" and c.spawned == []
    finally:
        child.kill()
        child.wait()
