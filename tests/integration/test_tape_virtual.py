"""The tape disaster drill with the virtual library and a real VM (libvirtd + QEMU):
back up the VM, write it to tape, send the tapes to the vault, lose the repository and
the tape catalog, bring the tapes back, rebuild the catalog from the tapes alone with the
exported key, restore the repository from tape, restore the VM and boot it. Also
``vmdr export`` of the snapshot as tar, and ``vmdr tape vault`` against the DR plan."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.guest.estate import TestVM

from .vmtools import repo_env, vmdr

pytestmark = pytest.mark.vm


def _undefine(name: str) -> None:
    for cmd in (["virsh", "-q", "destroy", name], ["virsh", "-q", "undefine", name]):
        subprocess.run(cmd, capture_output=True, check=False)


def test_tape_disaster_drill_boots(live_vm: TestVM, tmp_path: Path) -> None:
    env = repo_env(tmp_path)
    env.update(VMDR_TAPE_DIR=str(tmp_path / "tapecat"),
               VMDR_TAPE_LIBRARY=f"virtual:{tmp_path / 'vtl'}")
    vmdr(env, "backup", live_vm.name)
    vmdr(env, "tape", "virtual-create", str(tmp_path / "vtl"), "--tapes", "3",
         "--capacity", "2G")
    vmdr(env, "tape", "pool", "add", "weekly", "--vault", "bunker", "--retention", "8w")
    vmdr(env, "tape", "label", "--pool", "weekly", "--slot", "1", "--slot", "2")
    res = json.loads(vmdr(env, "tape", "backup", "--pool", "weekly", live_vm.name,
                          "--json").stdout)
    assert res["tapes"] == ["VMD001L8"] and res["chunks_written"] > 0
    # `vmdr export` for other backup software: disks and domain XML in one tar stream
    tar_path = tmp_path / "vm.tar"
    vmdr(env, "export", live_vm.name, "--format", "tar", "-o", str(tar_path))
    with tarfile.open(tar_path) as tf:
        names = tf.getnames()
    assert "domain.xml" in names and "disks/vda.raw" in names
    tar_path.unlink()
    key = tmp_path / "exported.key"
    vmdr(env, "key", "export", str(key))
    # the vault: the set goes to the import/export slots and is recorded offsite
    moved = vmdr(env, "tape", "export", "--media-set", res["media_set"], "--vault", "bunker")
    assert "VMD001L8" in moved.stdout
    vault = json.loads(vmdr(env, "tape", "vault", "--json").stdout)
    assert {v["label"]: v["location"] for v in vault}["VMD001L8"] == "vault:bunker"
    assert "Carried by" in vmdr(env, "tape", "vault").stdout

    # the disaster: the backup server is gone — repository and tape catalog
    shutil.rmtree(tmp_path / "repo")
    shutil.rmtree(tmp_path / "tapecat")
    vmdr(env, "tape", "import", "VMD001L8")  # the box comes back from the vault
    out = vmdr(env, "tape", "catalog", "--rebuild", "--key-file", str(key)).stdout
    assert "1 snapshots" in out
    env["VMDR_REPO"] = str(tmp_path / "rebuilt")
    vmdr(env, "tape", "restore", live_vm.name, "--key-file", str(key))
    new = f"{live_vm.name}-tape"
    target = live_vm.images.vms_dir / f"{live_vm.name}-tape"
    target.mkdir(parents=True, exist_ok=True)
    try:
        r = json.loads(vmdr(env, "restore", live_vm.name, "--name", new, "--target-dir",
                            str(target), "--define", "--start", "--timeout", "180", "--json",
                            "--key-file", str(key)).stdout)
        assert r["started"] and r["heartbeat_s"] > 0
    finally:
        _undefine(new)
        shutil.rmtree(target, ignore_errors=True)
