"""``vmdr ha status`` and ``vmdr ha events`` against a real etcd (one member on loopback)
holding two agents' member keys, a published HA VM, maintenance and events."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdr.agent.coord import Member
from vmdr.agent.coord_etcd import EtcdCoordinator, wait_for
from vmdr.ha.store import HAStore

from .agent_services import Etcd

pytestmark = [pytest.mark.etcd]
PREFIX = "/vmdr-status-test/"
XML = ("<domain><name>db</name><memory unit='KiB'>1048576</memory><vcpu>2</vcpu>"
       "</domain>")


@pytest.fixture(scope="module")
def etcd() -> Iterator[Etcd]:
    e = Etcd(1)
    try:
        wait_for(e.endpoints)
        yield e
    finally:
        e.stop()


def vmdr(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg), *args],
                       capture_output=True, text=True, check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_status_and_events(etcd: Etcd, tmp_path: Path) -> None:
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f"""
[agent]
etcd = ["{etcd.endpoints[0]}"]
etcd_prefix = "{PREFIX}"
[locations.dc]
kind = "building"
[hosts.h1]
location = "dc"
[hosts.h2]
location = "dc"
[hosts.h3]
location = "dc"
[ha]
[vm.db]
ha = true
""")
    coords = []
    for h in ("h1", "h2"):
        c = EtcdCoordinator(etcd.endpoints, 5, PREFIX)
        c.tick(Member(h, "http://x", 4, 4096, ["db"] if h == "h1" else []), 1.0)
        coords.append(c)
    store = HAStore.for_coordinator(coords[0], me="h1")
    store.put_domain("db", XML, "h1")
    store.set_maintenance("h3", "disk swap")
    store.add_event("detected", "member lease of h9 expired", host="h9")
    store.add_event("started", "db started on h2", host="h2", vm="db")

    p = vmdr(cfg, "--json", "ha", "status")
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(p.stdout)
    assert d["leader"] == "h1"
    hosts = {h["host"]: h for h in d["hosts"]}
    assert hosts["h1"]["lease"] and hosts["h2"]["lease"] and not hosts["h3"]["lease"]
    assert hosts["h3"]["maintenance"]["reason"] == "disk swap"
    (vm,) = d["vms"]
    assert vm["vm"] == "db" and vm["host"] == "h1" and vm["would_go_to"] == "h2"
    assert d["headroom"]["ok"]
    p = vmdr(cfg, "ha", "status")
    assert p.returncode == 0 and "leader: h1" in p.stdout
    assert "db" in p.stdout and "if its host fails: h2" in p.stdout

    p = vmdr(cfg, "--json", "ha", "events", "--vm", "db")
    assert [e["kind"] for e in json.loads(p.stdout)] == ["started"]
    p = vmdr(cfg, "ha", "events", "--since", "1h")
    assert "detected" in p.stdout and "started" in p.stdout
    p = vmdr(cfg, "ha", "events", "--since", "yesterday-ish")
    assert p.returncode == 2 and p.stderr.startswith("vmdr: error: --since:")

    # h2's libvirtd dies: alive, but no target any more (h3 is in maintenance): no room
    coords[1].tick(Member("h2", "http://x", 4, 4096, [], libvirt_ok=False,
                          libvirt_down=time.time() - 60, libvirt_error="Failed to connect"),
                   2.0)
    p = vmdr(cfg, "--json", "ha", "status")
    d = json.loads(p.stdout)
    h2 = next(h for h in d["hosts"] if h["host"] == "h2")
    assert h2["lease"] and h2["libvirt"]["ok"] is False, h2
    assert d["vms"][0]["would_go_to"] is None and not d["headroom"]["ok"], d
    p = vmdr(cfg, "ha", "status")
    assert p.returncode == 1 and "Traceback" not in p.stderr and not p.stderr, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("h2 "))
    assert "libvirt DOWN since " in line and "no failover target" in line, p.stdout
    db = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("db "))
    assert "if its host fails: cannot be placed" in db, p.stdout
    for c in coords:
        c.close()
