"""``vmdr plan`` against the real local libvirtd (read-only discovery) and a real repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.repofixtures import PASS, make_repo
from tests.unit.test_plan_estates import GIB, write_snapshot
from vmdr.timeutil import utcnow

pytestmark = pytest.mark.vm

URI = "qemu:///system"


def _domains() -> list[str]:
    try:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        conn = libvirt.openReadOnly(URI)
        try:
            return sorted(d.name() for d in conn.listAllDomains(0))
        finally:
            conn.close()
    except Exception as e:  # no python3-libvirt, or no libvirtd
        pytest.skip(f"libvirt not available: {e}")


def test_discovery_and_coverage_on_the_local_host(tmp_path: Path) -> None:
    domains = _domains()
    pw = tmp_path / "pass"
    pw.write_text(PASS + "\n")
    pw.chmod(0o600)
    repo = make_repo(str(tmp_path / "repo"))
    write_snapshot(repo, "planned", utcnow(), 2 * GIB)
    repo.close()
    cfg = tmp_path / "estate.toml"
    cfg.write_text(f"""
[locations.lab]
kind = "building"
[hosts.local]
location = "lab"
uri = "{URI}"
vcpus = 4
memory = "8GiB"
[repositories.r]
url = "{tmp_path / 'repo'}"
location = "lab"
password_file = "{pw}"
[vm.planned]
host = "local"
must_survive = ["vm"]
""")
    env = dict(os.environ, VMDR_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg), "plan",
                        "coverage", "--json"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    host = doc["sources"]["hosts"]["local"]
    # other tests create and remove domains meanwhile: compare with what discovery saw
    assert host["reachable"] is True and host["vms"] == len(doc["vms"]) - 1
    assert "planned" in doc["vms"] and (host["vms"] > 0) == bool(domains)
    for name in set(doc["vms"]) - {"planned"}:  # found by discovery, not in the inventory
        assert doc["vms"][name]["in_inventory"] is False
        assert doc["vms"][name]["vcpus"] >= 1
    assert doc["vms"]["planned"]["levels"]["vm"]["covered"] is True
    assert doc["sources"]["repositories"]["r"]["reachable"] is True
    cache = json.loads((tmp_path / "cache" / "plan-facts.json").read_text())
    assert "local" in cache["hosts"] and "r" in cache["repositories"]
