"""HAStore against a real etcd (one member on loopback)."""

from __future__ import annotations

import pytest

from tests.unit.test_ha_store import exercise
from vmdr.agent.coord_etcd import EtcdCoordinator, wait_for
from vmdr.ha.store import EtcdKV

from .agent_services import Etcd

pytestmark = [pytest.mark.etcd]


def test_store_on_etcd() -> None:
    e = Etcd(1)
    try:
        wait_for(e.endpoints)
        coord = EtcdCoordinator(e.endpoints, 5, "/vmdr-store-test/")
        exercise(EtcdKV(coord), "/vmdr-store-test/")
    finally:
        e.stop()


def test_leader_resume_on_etcd() -> None:
    """The in-flight resume of tests/unit/test_ha_leader.py with the records in a real
    etcd: the old leader dies after a start it did not record; the new one re-checks
    libvirt, does not start it again, and finishes the failover."""
    from tests.unit.test_ha_leader import HOSTS, live, running, setup
    from vmdr.ha.leader import HALeader
    from vmdr.ha.store import HAStore

    e = Etcd(1)
    try:
        wait_for(e.endpoints)
        fleet, ops, mem, policy = setup(ready_delay=0.0)
        store = HAStore(EtcdKV(EtcdCoordinator(e.endpoints, 5, "/vmdr-resume/")),
                        "/vmdr-resume/", me="h2")
        for vm in ("db", "app"):
            store.put_domain(vm, mem.domain(vm) or "", "h1")
        fleet.hosts["fake://h1/system"].up = False
        HALeader(policy, store, ops, "h2").step(10.0, live("h2", "h3"), set(HOSTS))
        HALeader(policy, store, ops, "h2").step(12.0, live("h2", "h3"), set(HOSTS))
        (db_at,) = running(fleet, "db")
        rec = store.failover("h1")
        assert rec is not None
        rec["started"].clear()
        store.put_failover("h1", rec)
        new = HALeader(policy, store, ops, "h3")
        new.step(13.0, live("h3"), set(HOSTS))
        assert running(fleet, "db") == [db_at]
        fleet.hosts[db_at].domains["db"].agent = True
        new.step(14.0, live("h3"), set(HOSTS))
        new.step(14.5, live("h3"), set(HOSTS))
        assert len(running(fleet, "app")) == 1
        fleet.hosts[running(fleet, "app")[0]].domains["app"].agent = True
        new.step(15.0, live("h3"), set(HOSTS))
        done = store.failover("h1")
        assert done is not None and done["done"]
        kinds = [ev.kind for ev in store.events()]
        assert kinds.count("started") == 2 and "gave-up" in kinds
    finally:
        e.stop()
