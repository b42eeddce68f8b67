"""Continuous replication between two sites (tests/multihost): a guest on h1 writing
sequence-numbered records, its disks mirrored to h2 through an ssh tunnel on the test
network inside the namespaces; vmdr runs inside h1. Nothing contacts a test address from
the root namespace (files of h2 are read from its directory on this machine).

1. the asynchronous mirror: in step, restore points taken in the serving daemon, then
   ``vmdr replicate stop``: the DR copy holds the record stream up to the stop, intact;
   it runs under ``--bwlimit`` windows that alternate every minute: libvirt's block job
   reports the window's cap, and the other one once the minute turns;
2. the synchronous mirror: stopped, the DR copy holds every record written before;
3. the synchronous mirror again, then a partition of the DR host while the guest writes:
   the guest's records keep coming (no stall beyond a bound), the mirror is aborted, the
   VM is on its own disk, and the supervisor says it fell back.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.records import check_records
from tests.multihost.cluster import Cluster
from tests.multihost.fixtures import skip_unless_multihost
from tests.multihost.hosts import Host

pytestmark = [pytest.mark.vm, pytest.mark.multihost]
ROOT = "/var/lib/libvirt/images/vmdr-replicas"  # inside h2


@pytest.fixture
def sites() -> Iterator[Cluster]:
    skip_unless_multihost()
    with Cluster(hosts=2, etcd=False, sshd=True) as c:
        yield c


def _vmdr(host: Host, *args: str, timeout: float = 120) -> dict[str, Any]:
    p = host.run(sys.executable, "-m", "vmdr.cli.main", *args, check=False, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.3)


def _mirror_state(vmdir: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((vmdir / "mirror.json").read_text())
        return doc
    except (OSError, ValueError):
        return {}


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text(errors="replace").splitlines()
            if ln.startswith("{")]


def _block_jobs(h: Host, dom: str) -> str:
    return h.virsh("blockjob", dom, "vdb", "--info", check=False).stdout.strip()


SLOW, FAST = 16 << 20, 64 << 20  # the alternating windows' caps for the whole mirror


def _alternating_windows() -> str:
    """--bwlimit rules: the next ten minutes alternate SLOW and FAST (local time, as the
    supervisor reads it), so the window changes within a minute of any moment."""
    now = dt.datetime.now().astimezone().replace(second=0, microsecond=0)
    rules = []
    for k in range(1, 11, 2):
        t = now + dt.timedelta(minutes=k)
        rules.append(f"{t:%H:%M}..{t + dt.timedelta(minutes=1):%H:%M} 16M")
    return "; ".join([*rules, "* 64M"])


def _job_bandwidth(h: Host, dom: str, disk: str) -> int | None:
    """The cap libvirt reports for the block job on ``disk`` (bytes/s), None: no job."""
    import libvirt

    info = h.conn().lookupByName(dom).blockJobInfo(
        disk, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
    return int(info["bandwidth"]) if info else None


def _point_records(img: Path, tag: str, tmp: Path) -> Any:
    raw = tmp / f"{tag}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-l",
                    f"snapshot.name={tag}", "-O", "raw", str(img), str(raw)], check=True,
                   capture_output=True)
    try:
        return check_records(str(raw))
    finally:
        raw.unlink()


def test_mirror_async_and_sync_and_partition(sites: Cluster, tmp_path: Path) -> None:
    h1, h2 = sites.hosts
    g = sites.new_guest(local_to=h1, writer_rate=20)
    g.start(h1)
    g.wait_heartbeat(90)
    g.wait_writer(timeout=60)
    to = sites.ssh_uri(h2) + "&known_hosts=/dev/null"
    vmdir = h2.dir / "lib-libvirt" / "images" / "vmdr-replicas" / g.name
    img = vmdir / f"{g.name}-replica-vdb.qcow2"
    own = h1.virsh("domblklist", g.name).stdout

    def start(*extra: str) -> tuple[subprocess.Popen[Any], Path]:
        ev = tmp_path / f"events-{len(list(tmp_path.iterdir()))}.jsonl"
        p = h1.popen(sys.executable, "-m", "vmdr.cli.main", "--json-events", "replicate",
                     g.name, "--to", to, "--dir", ROOT, "--points", "4", "--rpo", "1m",
                     "--json", *extra, stdout=subprocess.PIPE,
                     stderr=ev.open("wb"))
        return p, ev

    # -- 1. asynchronous mirror --------------------------------------------------------------
    p, ev = start("--continuous", "--point-interval", "4s", "--retry", "300s",
                  "--bwlimit", _alternating_windows())
    try:
        _wait("mirror in step", lambda: _mirror_state(vmdir).get("state") == "mirroring"
              or p.poll() is not None, 150)
        assert p.poll() is None, ev.read_text()[-2000:]
        assert _mirror_state(vmdir)["mode"] == "mirror"
        # the block jobs run capped: the window's rate, split over the mirrored disks
        disks = sorted(json.loads((vmdir / "replica.json").read_text())["disks"])
        caps = {SLOW // len(disks), FAST // len(disks)}
        first = _wait("a capped block job", lambda: (
            b := _job_bandwidth(h1, g.name, "vdb")) in caps and b, 30)
        assert {_job_bandwidth(h1, g.name, d) for d in disks} <= caps
        _wait("a restore point of the mirror", lambda: any(
            pt["feed"] == "mirror" for pt in json.loads(
                (vmdir / "replica.json").read_text())["points"]), 30)
        st = _vmdr(h1, "replicate", "status", "--to", to, "--dir", ROOT, "--json")
        row = st["replicas"][0]
        assert row["mode"] == "mirror" and row["sla_label"] == "Meeting SLA", row
        assert row["rpo_achieved_s"] < 15, row
        # the DR copy keeps up: a point taken while mirroring holds the recent records
        seq_before = g.wait_writer(timeout=30)
        time.sleep(6)
        pts = json.loads((vmdir / "replica.json").read_text())["points"]
        rc = _point_records(img, pts[-1]["name"], tmp_path)
        assert rc.consistent, rc.problems
        assert rc.last_seq >= seq_before - 20  # seconds behind at most (20 records/s)
        # the minute turns: the supervisor moves every job to the other window's cap
        (other,) = caps - {first}
        _wait("the next window's cap", lambda: _job_bandwidth(h1, g.name, "vdb") == other,
              90)
        assert any(e["type"] == "phase" and e.get("phase") == "bandwidth"
                   for e in _events(ev)), "no bandwidth event"
        seq_stop = g.wait_writer(timeout=30)
        _vmdr(h1, "replicate", "stop", g.name, "--json")
        assert p.wait(60) == 0, ev.read_text()[-2000:]
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(60)
        print(ev.read_text(errors="replace")[-3000:])
    assert _block_jobs(h1, g.name) in ("", "No current block job for vdb")
    assert h1.virsh("domblklist", g.name).stdout == own  # never left on a foreign disk
    assert _mirror_state(vmdir)["state"] == "stopped"
    rc = check_records(str(img), "qcow2", force_share=True)
    assert rc.consistent, rc.problems
    assert rc.last_seq >= seq_stop  # everything written before the stop reached the DR copy
    g.wait_writer(above=seq_stop + 10, timeout=30)  # the guest never noticed

    # -- 2. synchronous mirror: every completed write is at the DR copy ---------------------
    p, ev = start("--sync", "--point-interval", "1h")
    try:
        _wait("sync mirror in step", lambda: (_mirror_state(vmdir).get("state") == "mirroring"
                                               and _mirror_state(vmdir).get("mode") == "sync")
              or p.poll() is not None, 150)
        assert p.poll() is None, ev.read_text()[-2000:]
        seq_sync = g.wait_writer(above=g.wait_writer(timeout=30) + 5, timeout=30)
        _vmdr(h1, "replicate", "stop", g.name, "--json")
        assert p.wait(60) == 0, ev.read_text()[-2000:]
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(60)
    rc = check_records(str(img), "qcow2", force_share=True)
    assert rc.consistent, rc.problems
    assert rc.last_seq >= seq_sync
    assert h1.virsh("domblklist", g.name).stdout == own

    # -- 3. synchronous mirror, then the DR host is partitioned ------------------------------
    p, ev = start("--sync", "--point-interval", "1h", "--stall", "8s", "--retry", "600s")
    try:
        _wait("sync mirror in step", lambda: (_mirror_state(vmdir).get("state") == "mirroring"
                                               and _mirror_state(vmdir).get("mode") == "sync")
              or p.poll() is not None, 150)
        assert p.poll() is None, ev.read_text()[-2000:]
        seq = g.wait_writer(timeout=30)
        h2.partition()
        t0 = time.monotonic()
        # the guest keeps writing: records keep coming within a bound (ssh keepalive 3 s)
        g.wait_writer(above=seq + 20, timeout=20)
        stalled_for = time.monotonic() - t0
        _wait("the mirror aborted", lambda: any(
            e["type"] == "warning" and "mirror aborted" in e["message"] for e in _events(ev)),
            30)
        _wait("no block job", lambda: _block_jobs(h1, g.name) in ("", "No current block "
                                                                   "job for vdb"), 20)
        assert h1.virsh("domblklist", g.name).stdout == own
        assert h1.virsh("domstate", g.name).stdout.strip() == "running"
        g.wait_writer(above=seq + 100, timeout=30)
        assert stalled_for < 20
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGUSR1)  # a traceback of every thread into the log
            time.sleep(1)
        h2.heal()
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(90)
        print(ev.read_text(errors="replace")[-6000:])
    assert h1.virsh("domblklist", g.name).stdout == own
