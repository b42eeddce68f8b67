"""`vmdr ha maintenance` and `vmdr ha test` on three real libvirt hosts and a real etcd.

A running HA guest on h1 (shared storage): `vmdr ha maintenance h1` live-migrates it to h2
by the placement rules while it keeps writing its record stream; then `vmdr ha test`
boots an isolated copy on h3 (h1 is in maintenance, so h3 is where it would fail over to)
while the original keeps running on h2; the copy answers, is removed with its overlays,
and the pass lands in etcd. The guest's record stream is one consistent history at the
end (the test's temporary overlay was merged back into the production disks). Last, the
guest's QEMU is killed with its watchdog's restart budget spent: the watchdog restarts it
on another host by placement, and it resumes its record stream from the shared disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.records import check_records
from tests.multihost.cluster import Cluster
from vmdr import config
from vmdr.agent.coord_etcd import EtcdCoordinator
from vmdr.cli.ha_ops_cmds import host_connector
from vmdr.ha.escalate import Escalator
from vmdr.ha.model import load_policy
from vmdr.ha.monitor import Monitor
from vmdr.ha.records import HARecords
from vmdr.ha.store import HAStore
from vmdr.ha.wdsettings import WatchdogSettings
from vmdr.hypervisor import connect
from vmdr.plan import inventory

pytestmark = [pytest.mark.multihost, pytest.mark.vm]

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def vmdr(cfg: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*VMDR, "--config", str(cfg), *args], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, VMDR_CONFIG=str(cfg)))
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_maintenance_migrates_live_then_ha_test_boots_an_isolated_copy(
        mh_cluster: Cluster, tmp_path: Path) -> None:
    h1, h2, h3 = mh_cluster.hosts
    assert mh_cluster.etcd is not None
    endpoints = mh_cluster.etcd.root_endpoints()  # route-guarded: through the root leg
    prefix = f"/vmdr-haops-{os.getpid()}/"
    g = mh_cluster.new_guest(writer_rate=20)
    hosts = "".join(f"""
[hosts.{h.name}]
location = "b1"
uri = "{h.uri}"
migration_uri = "{h.tcp_uri}"
vcpus = 2
memory = "2GiB"
""" for h in (h1, h2, h3))
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f"""
[agent]
etcd = {json.dumps(endpoints)}
etcd_prefix = "{prefix}"
[locations.b1]
kind = "building"
{hosts}
[vm.{g.name}]
host = "h1"
ha = true
vcpus = 1
memory = "128MiB"
""")
    records = HARecords(HAStore.for_coordinator(EtcdCoordinator(endpoints, 5, prefix)))
    g.start(h1)
    g.wait_heartbeat(90)
    seq0 = g.wait_writer(timeout=60)

    # bad input first: nothing moves
    p = vmdr(cfg, "ha", "maintenance", "h9")
    assert p.returncode == 2 and p.stderr.startswith("vmdr: error: unknown host 'h9'"), p.stderr

    p = vmdr(cfg, "ha", "maintenance", "h1", "--unsafe", "--reason", "kernel update",
             "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [(m["vm"], m["from"], m["to"]) for m in doc["moves"]] == [(g.name, "h1", "h2")]
    g.host = h2
    g.known.add(h2)
    assert g.is_running_on(h2) and not g.is_running_on(h1)
    assert g.name not in h1.domain_states()  # undefined at the source
    assert records.maintenance()["h1"]["reason"] == "kernel update"
    beats = g.heartbeats()[-1]
    g.wait_heartbeat(30, count=beats + 2)  # the same boot keeps beating on h2
    seq1 = g.wait_writer(above=seq0, timeout=60)

    evidence = tmp_path / "evidence"
    p = vmdr(cfg, "ha", "test", g.name, "--timeout", "120", "--evidence-dir", str(evidence),
             "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert res["ok"] and (res["from"], res["to"]) == ("h2", "h3"), res
    assert res["ready_s"] is not None and res["evidence"], res
    assert Path(res["evidence"][0]).stat().st_size > 0
    assert g.is_running_on(h2)  # production kept running
    assert not [n for n in h3.domain_states() if n.startswith("vmdr-hatest-")]
    leftovers = [f.name for f in g.dir.iterdir() if "hatest" in f.name]
    assert leftovers == []
    xml = g.domain(h2).XMLDesc(0)
    assert "hatest" not in xml and str(g.boot_disk) in xml  # back on its own images
    test = records.tests()[g.name]
    assert (test.kind, test.source, test.target) == ("test", "h2", "h3")
    evs = [e["kind"] for e in records.events()]
    assert evs == ["maintenance", "migrated", "tested"], evs
    seq2 = g.wait_writer(above=seq1, timeout=60)

    print(f"maintenance: migrated in {doc['moves'][0]['seconds']}s; ha test: copy started "
          f"in {res['start_s']}s, answered after {res['ready_s']}s")

    # h1 leaves maintenance; its records go
    p = vmdr(cfg, "ha", "maintenance", "h1", "--exit")
    assert p.returncode == 0 and "maintenance ended" in p.stdout
    assert records.maintenance() == {}

    # the watchdog on h2: QEMU killed, restart budget 0 → restarted on another host
    inv = inventory.from_config(config.load(str(cfg)))
    esc = Escalator(inv, load_policy(inv), host_connector(inv), "h2", records)
    s = WatchdogSettings(g.name, enabled=True, restart_budget=0,
                         evidence_dir=str(tmp_path / "wd"))
    mon = Monitor(lambda: connect(h2.uri), [s], escalate=esc)
    mon.cycle()
    qemu = h2.daemon_pid("qemu-system-x86")
    assert qemu is not None
    os.kill(qemu, signal.SIGKILL)
    t0 = time.monotonic()
    kinds = []
    while "escalated" not in kinds and time.monotonic() - t0 < 90:
        kinds += [e.kind for e in mon.cycle()]
        time.sleep(0.5)
    mon.close()
    assert "escalated" in kinds and "gave-up" not in kinds, (kinds, esc.last)
    now_on = next(h for h in (h1, h3) if g.is_running_on(h))
    g.host = now_on
    g.known.add(now_on)
    assert g.name not in h2.domain_states()  # undefined on h2: it cannot run twice
    seq3 = g.wait_writer(above=seq2, timeout=90)  # the new boot goes on from the disk
    print(f"watchdog escalation: running on {now_on.name} "
          f"{time.monotonic() - t0:.1f}s after the kill")
    assert [e["kind"] for e in records.events()][-2:] == ["placed", "started"]

    g.destroy(now_on)
    rc = check_records(g.data_disk, "qcow2")
    assert rc.consistent, rc.problems
    assert rc.last_seq >= seq3
