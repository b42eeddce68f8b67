"""A real ``vmdr restore --define --start`` is recorded in the repository, and ``vmdr plan``
estimates with it: measured restore rate and boot time (libvirtd + a QEMU guest)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.guest.estate import TestVM
from vmdr.repository.repo import Repository
from vmdr.storage.file import FileBackend

from .vmtools import backup, repo_env, vmdr

pytestmark = pytest.mark.vm


def _undefine(name: str) -> None:
    for cmd in (["virsh", "-q", "destroy", name], ["virsh", "-q", "undefine", name]):
        subprocess.run(cmd, capture_output=True, check=False)


def test_a_restore_measures_the_plan(tmp_path: Path) -> None:
    env = repo_env(tmp_path)
    with TestVM(start=False) as vm:
        r = backup(env, vm.name)["results"][0]
        assert r["status"] == "ok"
        new = f"{vm.name}-p"
        try:
            res = json.loads(vmdr(env, "restore", vm.name, "--name", new, "--target-dir",
                                  str(vm.dir / "plan-restore"), "--define", "--start",
                                  "--timeout", "180", "--json").stdout)
        finally:
            _undefine(new)
    assert res["started"] and res["heartbeat_s"] > 0 and res["attachment"]

    pw = Path(env["VMDR_PASSWORD_FILE"]).read_text().strip()
    repo = Repository.open(FileBackend(env["VMDR_REPO"]), passphrase=lambda: pw)
    try:
        (rec,) = repo.attachments(r["snapshot"], "restore")
        size = sum(d.size for d in repo.load_snapshot(r["snapshot"]).disks)
    finally:
        repo.close()
    assert rec["target"] == "qemu:///system" and rec["repository"] == repo.id
    assert rec["size"] == size and rec["bytes_written"] == res["bytes_written"]
    assert rec["restore_s"] == res["restore_s"] and rec["heartbeat_s"] == res["heartbeat_s"]

    cfg = tmp_path / "estate.toml"
    cfg.write_text(f"""
[locations.lab]
kind = "building"
[hosts.local]
location = "lab"
vcpus = 4
memory = "8GiB"
[repositories.r]
url = "{env['VMDR_REPO']}"
location = "lab"
[vm.{vm.name}]
host = "local"
""")
    doc = json.loads(vmdr(env, "--config", str(cfg), "--json", "plan", "coverage",
                          "--offline", "--no-cache").stdout)
    src = doc["sources"]["repositories"]["r"]
    assert src["throughput_source"] == "measured (1 restores)"
    assert src["restore_throughput"] == round(size / res["restore_s"])
    assert doc["vms"][vm.name]["boot_estimate_s"] == pytest.approx(res["heartbeat_s"])
