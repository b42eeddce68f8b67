"""HAStore: the contract's keys, typed (MemoryKV here; tests/integration/test_ha_store_etcd.py
runs the same checks against a real etcd)."""

from __future__ import annotations

import json

import pytest

from vmdr.ha.store import KV, HAStore, MemoryKV


def exercise(kv: KV, prefix: str) -> None:
    st = HAStore(kv, prefix, me="h1")
    st.put_domain("db", "<domain><name>db</name></domain>", "h1", now=10.0)
    assert st.domain("db") == "<domain><name>db</name></domain>"
    assert st.where("db") == "h1" and st.wheres() == {"db": "h1"}
    assert st.domain_names() == ["db"]
    assert kv.get(prefix + "ha/where/db") == json.dumps({"host": "h1", "time": 10.0})

    rec = {"host": "h2", "detected": 1.0, "fence_until": 3.0, "plan": {}, "started": {},
           "ready": {}, "done": False}
    assert st.create_failover("h2", rec)
    assert not st.create_failover("h2", dict(rec, detected=2.0))  # one record per host
    assert st.failover("h2") == rec
    st.put_failover("h2", dict(rec, done=True))
    assert st.failovers() == {"h2": dict(rec, done=True)}
    st.delete_failover("h2")
    assert st.failover("h2") is None

    for i in range(5):
        st.add_event("placed", f"r{i}", host="h2", vm="db" if i % 2 else "app",
                     now=100.0 + i)
    assert [e.reason for e in st.events()] == ["r0", "r1", "r2", "r3", "r4"]
    assert [e.reason for e in st.events(vm="db")] == ["r1", "r3"]
    assert [e.reason for e in st.events(since=103.0)] == ["r3", "r4"]
    assert st.trim_events(keep=2) == 3
    assert [e.reason for e in st.events()] == ["r3", "r4"]
    with pytest.raises(ValueError):
        st.add_event("exploded", "no such kind")

    st.set_maintenance("h3", "kernel update", now=5.0)
    assert st.maintenance() == {"h3": {"since": 5.0, "reason": "kernel update"}}
    st.clear_maintenance("h3")
    assert st.maintenance() == {}

    st.put_test("db", kind="real", from_="h1", to="h2", start_s=6.1, ready_s=13.0, now=7.0)
    assert st.test("db") == {"time": 7.0, "kind": "real", "from": "h1", "to": "h2",
                             "start_s": 6.1, "ready_s": 13.0}
    assert set(st.tests()) == {"db"}
    assert kv.requests > 20


def test_store_in_memory() -> None:
    exercise(MemoryKV(), "/vmdr/")


def test_event_keys_sort_by_time_and_keep_same_instant_order() -> None:
    kv = MemoryKV()
    st = HAStore(kv, "/p/", me="h9")
    for i in range(3):
        st.add_event("detected", str(i), now=50.0)
    st.add_event("fenced", "later", now=49.0 + 2)
    keys = kv.keys("/p/ha/events/")
    assert all(k.endswith("-h9") for k in keys)
    assert [e.reason for e in st.events()] == ["0", "1", "2", "later"]
