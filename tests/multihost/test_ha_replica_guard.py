"""A replica that HA started a VM from is never written again while the VM's data are on
it (issue 10/11; :mod:`vmdr.jobs.replica_guard`), on the 3-host harness.

h1 holds a VM with local disks, replicated to h3 (repository feed). ``kill -9`` of h1 → the
leader restarts the VM on h3 from the replica (overlays over the standby's disks, the
marker ``ha-inuse.json`` written by h3's agent before it touched them). Then, on h3:

* a replica cycle (the repository feed, which may run anywhere at any time) is refused
  with one line, exit 13, naming the HA copy and its host; the standby's disks keep
  exactly their restore points;
* ``vmdr replicate status`` shows the replica ``in-use`` with the same words;
* ``vmdr replicate release`` is refused while the copy runs there;
* the way back of docs/operations.md: the copy live-migrated to h2 with a full storage
  copy onto fresh local images (``--copy-storage-all``; standalone afterwards, nothing on
  the replica) — its overlays, no longer used by a running QEMU, still refuse a cycle;
  ``vmdr replicate release`` then frees the replica and the next cycle runs.

About 50 s after the harness is up.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host
from tests.multihost.noshared_setup import NosharedAgents, backed_up
from tests.multihost.test_ha_noshared import _kill_and_follow

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.etcd]
ROOT = Path(__file__).resolve().parents[2]
REPLICAS = "/var/lib/libvirt/images/vmdr-replicas"  # h3's own (a private mount per host)


def on(h: Host, pw: Path, *args: str) -> tuple[int, str, str]:
    p = h.run("env", f"PYTHONPATH={ROOT / 'src'}", f"VMDR_PASSWORD_FILE={pw}",
              "VMDR_LOCK_DIR=/run/vmdr-guard-test", sys.executable, "-m", "vmdr.cli.main",
              *args, check=False, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def snapshots(h: Host, vm: str) -> str:
    disk = f"{REPLICAS}/{vm}/{vm}-replica-vda.qcow2"
    return h.run("qemu-img", "snapshot", "-l", "-U", disk).stdout


def rehome(g: Guest, src: Host, dst: Host) -> None:
    """Live-migrate the HA copy from ``src`` to ``dst`` with ``--copy-storage-all`` onto
    new empty images there (the overlay and its backing file arrive as one standalone
    image); paths under the replica directory (disks, console log) rewritten."""
    base = f"{REPLICAS}/{g.name}/"
    xml = src.virsh("dumpxml", "--migratable", g.name).stdout
    root = ET.fromstring(xml)
    for disk in root.iterfind("./devices/disk"):
        s = disk.find("source")
        path = s.get("file", "") if s is not None else ""
        if s is None or not path.startswith(base):
            continue
        t = disk.find("target")
        dev = t.get("dev") if t is not None else "vdx"
        size = json.loads(src.run("qemu-img", "info", "-U", "--output=json",
                                  path).stdout)["virtual-size"]
        new = f"/var/lib/libvirt/images/{g.name}-{dev}.qcow2"  # dst's own directory
        dst.run("qemu-img", "create", "-q", "-f", "qcow2", new, str(size))
        s.set("file", new)
        for b in disk.findall("backingStore"):
            disk.remove(b)
    for el in root.iter():
        for attr in ("file", "path"):
            v = el.get(attr, "")
            if v.startswith(base) and "/ha/" not in v:
                el.set(attr, str(g.dir / f"rehome-{v.rsplit('/', 1)[1]}"))
    f = g.dir / "rehome.xml"
    f.write_text(ET.tostring(root, encoding="unicode"))
    src.close_connections()
    src.run("virsh", "-c", "qemu:///system", "migrate", "--live", "--p2p", "--persistent",
            "--undefinesource", "--unsafe", "--copy-storage-all", "--xml", str(f),
            "--persistent-xml", str(f), g.name, dst.tcp_uri,
            "--migrateuri", f"tcp://{dst.addr}", timeout=600)  # a port besides the NBD one
    g.host = dst
    g.known.add(dst)
    assert g.is_running_on(dst) and not g.is_running_on(src)
    assert src.virsh("domstate", g.name, check=False).returncode != 0  # undefined there
    for disk in ET.fromstring(dst.virsh("dumpxml", g.name).stdout).iterfind(
            "./devices/disk/source"):
        path = disk.get("file", "")
        if path.startswith("/var/lib/libvirt/images/"):
            info = json.loads(dst.run("qemu-img", "info", "-U", "--output=json",
                                      path).stdout)
            assert "backing-filename" not in info, info  # standalone: nothing on the replica


def test_a_replica_under_an_ha_copy_is_never_written(mh_cluster_session: Cluster) -> None:
    cluster = mh_cluster_session
    cluster.ensure_healthy()
    g, repo, pw, _env, _snap = backed_up(cluster)
    h3 = cluster.hosts[2]
    cycle = ("replicate", g.name, "--feed", "repository", "--repo", str(repo), "--to",
             "qemu:///system")
    rc, out, err = on(h3, pw, *cycle)
    assert rc == 0, (out, err)
    agents = NosharedAgents(cluster, g, repo, pw, replica_to="h3")
    try:
        try:
            host, _after, e, _detected = _kill_and_follow(cluster, g, agents)
        finally:
            agents.stop()  # nothing restarts the copy below
        assert host == "h3" and e["detail"]["restore"] == "replica", e
        marker = json.loads(h3.run("cat", f"{REPLICAS}/{g.name}/ha-inuse.json").stdout)
        assert (marker["vm"], marker["host"]) == (g.name, "h3"), marker
        points = snapshots(h3, g.name)

        rc, out, err = on(h3, pw, *cycle)
        assert rc == 13, (out, err)
        assert err.strip().count("\n") == 0, err
        assert f"in use by the HA copy of {g.name} on h3 since " in err and "(running)" in err
        assert snapshots(h3, g.name) == points

        rc, out, err = on(h3, pw, "--json", "replicate", "status", g.name, "--to",
                          "qemu:///system")
        assert rc == 0, (out, err)
        row = json.loads(out)["replicas"][0]
        assert row["sla"] == "in-use" and row["in_use"].startswith(
            f"in use by the HA copy of {g.name} on h3"), row

        release = ("replicate", "release", g.name, "--to", "qemu:///system")
        rc, out, err = on(h3, pw, *release)
        assert rc == 13 and f"{g.name} (running)" in err, (out, err)

        # the way back (docs/operations.md, "After an HA restart from a replica"): a live
        # migration with a full storage copy to fresh local disks on another host
        h2 = cluster.hosts[1]
        rehome(g, h3, h2)
        assert snapshots(h3, g.name) == points

        rc, out, err = on(h3, pw, *cycle)  # the copy is gone: its overlays still refuse
        assert rc == 13 and "not running: its overlays hold its data" in err, (out, err)
        rc, out, err = on(h3, pw, *release)
        assert rc == 0 and "overlay(s) removed" in out, (out, err)
        assert h3.run("test", "-e", f"{REPLICAS}/{g.name}/ha", check=False).returncode == 1
        rc, out, err = on(h3, pw, *cycle)
        assert rc == 0, (out, err)
    finally:
        for name in (g.name, f"{g.name}-replica"):
            h3.virsh("destroy", name, check=False)
            h3.virsh("undefine", name, check=False)
