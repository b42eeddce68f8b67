"""Fixtures of the multi-host harness (see fixtures.py)."""

from __future__ import annotations

import pytest

from tests.multihost.fixtures import mh_cluster, mh_cluster_session

__all__ = ["mh_cluster", "mh_cluster_session"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multihost: needs root, network namespaces, libvirtd, etcd")
