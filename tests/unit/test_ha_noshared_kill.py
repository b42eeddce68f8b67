"""HA without shared storage: the two windows a ``kill -9`` can hit that the multihost
test (tests/multihost/test_ha_noshared_kill.py) cannot aim at — the restoring agent dies
between spawning the instant-restore child and recording its PID, and the leader dies
between the ``started`` event and its record's write."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_ha_noshared import SNAP, T0, Cluster, stand_in_child
from vmdr.ha.leader import HALeader


def test_a_restarted_agent_finds_a_child_whose_pid_was_never_recorded(
        tmp_path: Path) -> None:
    """The agent died right after the spawn: the status says running without a PID. The
    live child (found by its command line: instant restore of db into this host's target
    directory) is adopted — neither a --resume beside it nor a 'failed' while it boots."""
    c = Cluster(tmp_path)
    target, oid = c.ordered(HALeader(c.policy, c.store, c.ops, "h2"))
    child = stand_in_child("--target-dir", str(tmp_path / target), f"db@{SNAP.id}",
                           "--name", "db")
    # one into another host's directory is somebody else's
    other = stand_in_child("--target-dir", str(tmp_path / "elsewhere"), f"db@{SNAP.id}",
                           "--name", "db")
    try:
        assert c.store.claim_restore("db", oid, {"by": target})
        c.store.put_restore_status("db", oid, {"state": "running", "time": T0 + 2,
                                               "point": SNAP.as_dict()})
        state = tmp_path / target / "db.instant.json"
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text("{}")
        fresh = c.executor(target)
        fresh.poll(T0 + 3)
        fresh.poll(T0 + 3.5)
        assert c.spawned == []
        st = c.store.restore_status("db", oid)
        assert st is not None and st["state"] == "running" and st["pid"] == child.pid
        c.fleet.host(c.uris[target]).add_domain(
            "<domain type='kvm'><name>db</name><memory unit='KiB'>262144</memory><vcpu>1"
            "</vcpu><os><type>hvm</type></os><devices/></domain>", active=True)
        fresh.poll(T0 + 4)
        st = c.store.restore_status("db", oid)
        assert st is not None and st["state"] == "started" and c.spawned == []
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


def test_a_new_leader_does_not_repeat_the_started_event(tmp_path: Path) -> None:
    """The old leader wrote the `started` event of the restored VM and died before its
    record said so: the new leader finds the event of that order and writes no second."""
    c = Cluster(tmp_path)
    old = HALeader(c.policy, c.store, c.ops, "h2")
    c.kill_h1()
    c.step(old, T0)
    c.step(old, T0 + 2)  # ordered; the target restores it
    c.step(old, T0 + 2.25)  # the target reports started
    before = c.store.failover("h1")
    assert before is not None and not before["restores"]["db"].get("running")
    c.step(old, T0 + 2.5)  # the old leader: the started event, then its record
    assert [e.vm for e in c.store.events() if e.kind == "started"] == ["db"]
    c.store.put_failover("h1", before)  # ... which it never wrote: killed in between
    new = HALeader(c.policy, c.store, c.ops, "h3")
    c.heartbeat("db")
    for t in (5, 5.5, 6, 6.5, 7):
        c.step(new, T0 + t)
    started = [e for e in c.store.events() if e.kind == "started" and e.vm == "db"]
    assert len(started) == 1, started
    rec = c.store.failover("h1")
    assert rec is not None and rec["restores"]["db"]["running"] and "db" in rec["ready"]
    assert rec["restores"]["db"]["lost_s"] == 252.0
    assert len(c.spawned) == 1 and len(c.where("db")) == 1
