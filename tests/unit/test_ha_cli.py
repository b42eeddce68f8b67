"""``vmdr ha validate`` and ``vmdr ha simulate`` through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.test_ha_policy import BASE

ESTATE = BASE + """
[ha.anti_affinity]
db = "host"
[vm.db2]
host = "hv3"
tier = "gold"
vcpus = 2
memory = "4GiB"
anti_affinity = "db"
[vm.web]
host = "hv2"
tier = "gold"
vcpus = 1
memory = "1GiB"
depends_on = ["app1"]
boot_group = 3
hosts = ["hv3"]
hosts_rule = "should"
"""


def vmdr(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg), "ha",
                        *args], capture_output=True, text=True, check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def estate(tmp_path: Path, text: str = ESTATE) -> Path:
    cfg = tmp_path / "estate.toml"
    cfg.write_text(text.replace('[vm.db1]\nhost = "hv1"\ntier = "gold"',
                                '[vm.db1]\nhost = "hv1"\ntier = "gold"\nanti_affinity = "db"'))
    return cfg


def test_simulate_places_in_boot_order(tmp_path: Path) -> None:
    p = vmdr(estate(tmp_path), "simulate", "--fail", "hv2", "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["ok"] and plan["failed"] == ["hv2"] and plan["unplaced"] == []
    starts = {s["vm"]: s for s in plan["starts"]}
    assert list(starts) == ["app1", "web"]
    assert starts["web"]["host"] == "hv3"  # its preferred host
    assert starts["web"]["after"] == ["app1"] and starts["web"]["stage"] == 1
    assert starts["app1"]["ready"] == {"check": "agent", "delay_s": 0.0, "timeout_s": 300.0}
    text = vmdr(estate(tmp_path), "simulate", "--fail", "hv2").stdout
    assert "stage 1 (priority 2):\n    app1 → hv" in text
    assert "stage 2 (priority 3):\n    web → hv3" in text


def test_simulate_impossible_failure_says_why(tmp_path: Path) -> None:
    p = vmdr(estate(tmp_path), "simulate", "--fail", "hv1,hv3", "--maintenance", "hv2")
    assert p.returncode == 1
    assert "cannot be placed:" in p.stdout
    assert "db1: no host is up, out of maintenance and of known capacity" in p.stdout
    assert "not under HA, stay down: batch" in p.stdout
    p = vmdr(estate(tmp_path), "simulate", "--fail", "hv1,hv3", "--json")
    unplaced = {u["vm"]: u["reason"] for u in json.loads(p.stdout)["unplaced"]}
    assert p.returncode == 1
    assert unplaced == {"db2": "anti-affinity group 'db': hv2 already has a member on its "
                               "host"}


def test_simulate_bad_host(tmp_path: Path) -> None:
    p = vmdr(estate(tmp_path), "simulate", "--fail", "hv9")
    assert p.returncode == 2
    assert p.stderr == "vmdr: error: --fail: unknown host 'hv9' (known: hv1, hv2, hv3)\n"


def test_validate_admission(tmp_path: Path) -> None:
    p = vmdr(estate(tmp_path), "validate", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["admission"]["ok"] and out["admission"]["scenarios"] == 3
    assert out["ha_vms"] == ["app1", "db1", "db2", "web"]
    assert out["settings"]["self_fence_after_s"] == 3.5
    # hv2 keeps 3 GiB free and hv3 runs db2: db1 (4 GiB) has nowhere to go if hv1 fails
    tight = ESTATE.replace('[hosts.hv2]\nlocation = "r1"\nvcpus = 8\nmemory = "16GiB"',
                           '[hosts.hv2]\nlocation = "r1"\nvcpus = 8\nmemory = "6GiB"')
    p = vmdr(estate(tmp_path, tight), "validate")
    assert p.returncode == 1
    assert "admission: cannot absorb 1 host failure(s) (refused):" in p.stdout
    assert "if hv1 fails: db1: " in p.stdout
    p = vmdr(estate(tmp_path, tight + '[ha]\nadmission = "warn"\n'), "validate")
    assert p.returncode == 0 and "(warning only)" in p.stdout


def test_help() -> None:
    for args in (["ha", "--help"], ["ha", "simulate", "--help"], ["ha", "validate", "--help"]):
        p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", *args], capture_output=True,
                           text=True, check=False)
        assert p.returncode == 0 and "usage: vmdr ha" in p.stdout
