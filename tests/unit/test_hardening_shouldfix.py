"""Issue 14, should-fix items: names, exit codes, tampered KDF parameters, private cache
files, no passphrase for nbdkit, no lock files left for names that are not VMs."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vmdr.errors import IntegrityError, UsageError, VMLocked
from vmdr.jobs.vmlock import VMLock
from vmdr.repository.manifest import Snapshot
from vmdr.repository.resolve import MAX_NAME_LEN, check_name

from .hardening_helpers import PASS, cli_env, empty_snapshot, make_repo, vmdr
from .repofixtures import make_image, reopen

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["", "   ", "a@b", "web\n01", "x\x1b[31m", "tab\there",
                                 " lead", "n" * (MAX_NAME_LEN + 1)])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError):
        check_name(bad)
    with make_repo(str(tmp_path / "r")) as r, pytest.raises(UsageError):
        r.save_snapshot(Snapshot(bad, T0, r.chunk_size))


def test_good_names_pass() -> None:
    for good in ("web01", "db.example.com", "vol/lv_home", "ünïcode-vm", "n" * MAX_NAME_LEN):
        assert check_name(good) == good


def test_cli_refuses_bad_image_name_and_keeps_legacy_names_reachable(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    img = tmp_path / "d.raw"
    content = make_image(str(img), 256 << 10)
    make_repo(env["VMDR_REPO"]).close()
    for bad in ("a@b", "", "x\ny", "n" * (MAX_NAME_LEN + 1)):
        p = vmdr("image", "backup", str(img), "--name", bad, env=env, code=2)
        assert "name" in p.stderr
    assert json.loads(vmdr("snapshots", "--json", env=env).stdout) == []
    # a snapshot an older vmdr made under a bad name (here: a copy keeps its name)
    from vmdr.jobs.image import backup_image

    with reopen(env["VMDR_REPO"]) as r:
        s = backup_image(r, str(img), "good").snapshot
        legacy = Snapshot("old@name", T0, r.chunk_size, s.disks,
                          meta={"kind": "image", "copied_from": {"snapshot": s.id}})
        r.save_snapshot(legacy)
    vmdr("image", "restore", legacy.id[:10], str(tmp_path / "o.raw"), env=env)
    assert (tmp_path / "o.raw").read_bytes() == content
    vmdr("image", "restore", f"old@name@{legacy.id[:8]}", str(tmp_path / "o2.raw"), env=env)


def test_repository_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "notarepo"
    f.write_text("hello\n")
    env = {"VMDR_REPO": str(f), "VMDR_PASSWORD": "x"}
    p = vmdr("snapshots", env=env, code=3)
    assert "no vmdr repository" in p.stderr
    vmdr("repo", "init", env=env, code=8)
    assert f.read_text() == "hello\n"


def _libvirt_test_driver() -> None:
    try:
        import libvirt

        libvirt.open("test:///default").close()
    except Exception as exc:  # no python3-libvirt, or no test driver
        pytest.skip(f"libvirt test driver unavailable: {exc}")


def test_vm_exit_codes_and_no_lock_files(tmp_path: Path) -> None:
    _libvirt_test_driver()
    env = cli_env(tmp_path)
    locks = tmp_path / "locks"
    env.update(VMDR_LOCK_DIR=str(locks), VMDR_CONNECT="test:///default")
    make_repo(env["VMDR_REPO"]).close()
    p = vmdr("backup", "nomatch*", env=env, code=11)
    assert "nomatch*" in p.stderr
    p = vmdr("backup", "nosuchvm", env=env, code=11)
    assert "vmdr: error: nosuchvm:" in p.stderr and "nosuchvm" in p.stdout
    assert not locks.exists() or os.listdir(locks) == []


def test_vm_with_a_bad_name_fails_before_reading(tmp_path: Path) -> None:
    _libvirt_test_driver()
    node = tmp_path / "node.xml"
    node.write_text("<node><domain type='test'><name>bad@vm</name><memory>65536</memory>"
                    "<os><type>hvm</type></os></domain></node>")
    env = cli_env(tmp_path)
    env.update(VMDR_LOCK_DIR=str(tmp_path / "locks"), VMDR_CONNECT=f"test://{node}")
    make_repo(env["VMDR_REPO"]).close()
    p = vmdr("backup", "bad*", env=env, code=2)
    assert "must not contain '@'" in p.stderr


def test_vm_lock_file_removed_and_still_exclusive(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_LOCK_DIR", str(tmp_path))
    a = VMLock("qemu:///system", "web").acquire()
    with pytest.raises(VMLocked):
        VMLock("qemu:///system", "web").acquire()
    a.release()
    assert os.listdir(tmp_path) == []
    with VMLock("qemu:///system", "web"), pytest.raises(VMLocked):
        VMLock("qemu:///system", "web").acquire()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("patch", [{"memory_kib": 1 << 40}, {"time_cost": 2**31},
                                   {"parallelism": 10**20}, {"memory_kib": "lots"},
                                   {"name": "scrypt", "n": 1 << 60, "r": 8, "p": 1}])
def test_tampered_kdf_parameters(tmp_path: Path, patch: dict[str, Any]) -> None:
    env = cli_env(tmp_path)
    with make_repo(env["VMDR_REPO"]) as r:
        empty_snapshot(r, "vm", T0)
        slot = r.key_slots()[0]
    good = dict(slot)
    slot["kdf"] = {**slot["kdf"], **patch}
    slot_path = Path(env["VMDR_REPO"]) / "keys" / slot["slot"]
    slot_path.write_text(json.dumps(slot))
    p = vmdr("snapshots", env=env, code=6)
    assert "tampered" in p.stderr
    with pytest.raises(IntegrityError):
        reopen(env["VMDR_REPO"])
    # an intact slot beside the tampered one still opens the repository
    (Path(env["VMDR_REPO"]) / "keys" / "0000000000000000").write_text(json.dumps(good))
    p = vmdr("snapshots", env=env)
    assert "skipping key slot" in p.stderr


def test_cache_files_are_private(tmp_path: Path) -> None:
    with make_repo(str(tmp_path / "r")) as r:
        empty_snapshot(r, "vm", T0)
        r.list_snapshots()
        assert r.cache is not None
        base = r.cache.path
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(base + suffix):
            assert stat.S_IMODE(os.stat(base + suffix).st_mode) == 0o600, suffix
    os.chmod(base, 0o644)  # left readable by an older vmdr
    with reopen(str(tmp_path / "r")):
        pass
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o600


def test_nbdkit_gets_no_passphrase(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vmdr.serve import server

    seen: dict[str, Any] = {}

    class FakePopen:
        def __init__(self, argv: list[str], **kw: Any) -> None:
            seen.update(kw)

    monkeypatch.setenv("VMDR_PASSWORD", PASS)
    monkeypatch.setenv("VMDR_PASSWORD_FILE", "/etc/vmdr/pass")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kept")  # storage credentials stay
    monkeypatch.setattr("vmdr.serve.server.subprocess.Popen", FakePopen)
    with open(tmp_path / "log", "wb") as logf:
        server._spawn(["nbdkit"], logf, detach=True)
    env = seen["env"]
    assert "VMDR_PASSWORD" not in env and "VMDR_PASSWORD_FILE" not in env
    assert env["AWS_ACCESS_KEY_ID"] == "kept"
