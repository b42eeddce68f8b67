"""pytest fixtures of the multi-host harness.

``tests/multihost/conftest.py`` imports them; a conftest elsewhere can do the same
(``from tests.multihost.fixtures import mh_cluster, mh_cluster_session  # noqa: F401``).

* ``mh_cluster_session`` (session): a :class:`Cluster` of three libvirt hosts h1..h3, a
  shared directory and a three-member etcd, up once per session, torn down at the end —
  also on failure, Ctrl-C or SIGTERM. Leftovers of killed runs are swept first.
* ``mh_cluster`` (function): the same cluster, healed before each test (partitions healed,
  killed hosts rebooted, killed etcd members restarted, guests of earlier tests removed).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from tests.multihost.cluster import Cluster

__all__ = ["mh_cluster", "mh_cluster_session", "skip_unless_multihost"]

_TOOLS = ("ip", "unshare", "nsenter", "libvirtd", "virtlogd", "virtlockd", "virsh", "etcd",
          "etcdctl", "qemu-system-x86_64")


def skip_unless_multihost() -> None:
    """Skip unless root with every tool the harness needs (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("the multi-host harness needs root (network namespaces)")
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing for the multi-host harness: {' '.join(missing)} "
                    "(scripts/setup.sh installs them)")


def _raise_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture(scope="session")
def mh_cluster_session() -> Iterator[Cluster]:
    skip_unless_multihost()
    # SIGTERM (timeouts, CI cancel) becomes KeyboardInterrupt, so the teardown below runs;
    # atexit covers an interpreter exit around pytest; SIGKILL is left to the sweeper
    # the next run does first.
    old = signal.getsignal(signal.SIGTERM)
    if old in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = Cluster(hosts=3, etcd=True)
    atexit.register(cluster.down)
    try:
        cluster.up()
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            atexit.unregister(cluster.down)
            if old in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def mh_cluster(mh_cluster_session: Cluster) -> Iterator[Cluster]:
    mh_cluster_session.ensure_healthy()
    yield mh_cluster_session
    for g in mh_cluster_session.guests:
        g.cleanup()
    mh_cluster_session.guests.clear()
