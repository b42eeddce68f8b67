"""Two sites: a guest on h1, its replica on h2, fed host to host over ssh on the test
network inside the namespaces (tests/multihost). vmdr runs inside h1 (the source site's
backup host); nothing contacts a test address from the root namespace.

Seed, then an incremental after the guest wrote more records; the source site is lost
(kill -9 of every h1 process); the replica's state is read at h2, and the standby boots
there holding a consistent prefix of the record stream, at least up to the records
written before the last cycle."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.guest.estate import HEARTBEAT_RE
from tests.guest.records import check_records
from tests.multihost.cluster import Cluster
from tests.multihost.fixtures import skip_unless_multihost

pytestmark = pytest.mark.vm
ROOT = "/var/lib/libvirt/images/vmdr-replicas"  # inside h2 (its own /var/lib/libvirt)


@pytest.fixture
def sites() -> Iterator[Cluster]:
    skip_unless_multihost()
    with Cluster(hosts=2, etcd=False, sshd=True) as c:
        yield c


def _vmdr(host: object, *args: str, timeout: float = 300) -> dict[str, Any]:
    p = host.run(sys.executable, "-m", "vmdr.cli.main", *args, check=False,  # type: ignore[attr-defined]
                 timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def test_two_site_replica_over_ssh_survives_source_loss(sites: Cluster) -> None:
    h1, h2 = sites.hosts
    g = sites.new_guest(local_to=h1, writer_rate=20)
    g.start(h1)
    g.wait_heartbeat(90)
    g.wait_writer(timeout=60)
    to = sites.ssh_uri(h2) + "&known_hosts=/dev/null"
    args = ("replicate", g.name, "--to", to, "--dir", ROOT, "--points", "3", "--rpo", "1h",
            "--json")
    seed = _vmdr(h1, *args)["results"][0]  # type: ignore[index]
    assert seed["mode"] == "seed" and seed["bytes_moved"] > 0
    assert 0 < seed["bytes_sent"] < seed["bytes_moved"]  # zstd frames over ssh (an OS disk)
    standby = f"{g.name}-replica"
    assert h2.virsh("domstate", standby).stdout.strip() == "shut off"
    assert h2.virsh("domuuid", standby).stdout.strip() != g.domain(h1).UUIDString()

    before = g.wait_writer(timeout=60)
    time.sleep(2)
    inc = _vmdr(h1, *args)["results"][0]  # type: ignore[index]
    assert inc["mode"] == "incremental"
    assert 0 < inc["bytes_moved"] < seed["bytes_moved"] / 4

    h1.kill()  # the source site is gone
    st = _vmdr(h2, "replicate", "status", "--to", "qemu:///system", "--dir", ROOT,
               "--json")["replicas"]
    assert [r["vm"] for r in st] == [g.name]  # type: ignore[index]
    row = st[0]  # type: ignore[index]
    assert row["newest_point"] == inc["point"] and row["sla"] == "meeting-sla"
    assert row["bytes_moved_per_cycle"] == [seed["bytes_moved"], inc["bytes_moved"]]

    h2.virsh("start", standby)
    vmdir = h2.dir / "lib-libvirt" / "images" / "vmdr-replicas" / g.name
    log = vmdir / f"{standby}-console.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and HEARTBEAT_RE.search(log.read_text(errors="replace"))):
        assert time.monotonic() < deadline, "the standby did not boot at the DR site"
        time.sleep(0.5)
    h2.virsh("destroy", standby)
    rc = check_records(str(vmdir / f"{standby}-vdb.qcow2"), "qcow2")
    assert rc.consistent, rc.problems
    assert rc.last_seq >= before
    h2.virsh("undefine", standby, check=False)
