"""``vmdr ha test`` killed with SIGKILL after the freeze, on real libvirt hosts: production
is left writing to the temporary ``*.hatest.vmdr-overlay.qcow2``; ``vmdr ha test VM
--recover`` merges it back (blockcommit + pivot), so the domain's disks are its own images
again, nothing of the test is left, and the guest's record stream is one consistent
history."""

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

pytestmark = [pytest.mark.multihost, pytest.mark.vm]

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def test_killed_ha_test_is_recovered(mh_cluster: Cluster, tmp_path: Path) -> None:
    h1, h2, _h3 = mh_cluster.hosts
    g = mh_cluster.new_guest(writer_rate=20)
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text("[locations.b1]\nkind = \"building\"\n" + "".join(f"""
[hosts.{h.name}]
location = "b1"
uri = "{h.uri}"
vcpus = 2
memory = "2GiB"
""" for h in (h1, h2)) + f"""
[vm.{g.name}]
host = "h1"
ha = true
vcpus = 1
memory = "128MiB"
""")
    env = dict(os.environ, VMDR_CONFIG=str(cfg))
    g.start(h1)
    g.wait_heartbeat(90)
    seq0 = g.wait_writer(timeout=60)

    proc = subprocess.Popen([*VMDR, "--config", str(cfg), "ha", "test", g.name,
                             "--timeout", "120", "--evidence-dir", str(tmp_path / "ev")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    state = g.dir / f"{g.name}.hatest.vmdr-state.json"
    deadline = time.monotonic() + 60
    copies: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        copies = [n for n in h2.domain_states() if n.startswith("vmdr-hatest-")]
        if copies and "hatest.vmdr-overlay" in g.domain(h1).XMLDesc(0):
            break
        time.sleep(0.2)
    assert proc.poll() is None and copies, proc.communicate()
    assert state.stat().st_mode & 0o777 == 0o600
    proc.send_signal(signal.SIGKILL)  # after the freeze, while the copy boots
    proc.communicate()
    live = g.domain(h1).XMLDesc(0)
    assert "hatest.vmdr-overlay" in live  # the gap: production on the temporary overlay
    assert state.exists()
    seq1 = g.wait_writer(above=seq0, timeout=60)  # it keeps writing (to the overlay)

    p = subprocess.run([*VMDR, "--config", str(cfg), "ha", "test", g.name, "--recover",
                        "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    done = json.loads(p.stdout)["recovered"]
    assert any("merged leftover overlay" in d for d in done), done
    xml = g.domain(h1).XMLDesc(0)
    assert "hatest" not in xml and str(g.boot_disk) in xml and str(g.data_disk) in xml
    inactive = g.domain(h1).XMLDesc(2)  # VIR_DOMAIN_XML_INACTIVE
    assert "hatest" not in inactive
    assert [f.name for f in g.dir.iterdir() if "hatest" in f.name] == []
    assert not [n for n in h2.domain_states() if n.startswith("vmdr-hatest-")]
    seq2 = g.wait_writer(above=seq1, timeout=60)  # and goes on, on its own images
    p = subprocess.run([*VMDR, "--config", str(cfg), "ha", "test", g.name, "--recover"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "nothing left" in p.stdout, p.stdout + p.stderr

    g.destroy(h1)
    rc = check_records(g.data_disk, "qcow2")
    assert rc.consistent, rc.problems
    assert rc.last_seq >= seq2
    print(f"ha test killed after the freeze; --recover: {'; '.join(done)}")
