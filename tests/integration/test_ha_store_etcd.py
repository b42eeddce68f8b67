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
