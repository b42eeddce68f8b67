"""Full disks: a small tmpfs as the repository and as the restore target. vmdr stops with
exit 9 and one line, loses nothing it already had, and the repository still checks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cli import Result, assert_clean_failure, clean_env, run_vmdr
from .killer import assert_only_stale_temps

MIB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path) -> None:
    """Fill *fs* to the last byte."""
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "pw"
    pw.write_text("full disk passphrase\n")
    pw.chmod(0o600)
    return clean_env({"VMDR_PASSWORD_FILE": str(pw), "VMDR_CACHE_DIR": str(tmp_path / "cache")})


def ok(argv: list[str], env: dict[str, str]) -> Result:
    res = run_vmdr(argv, env, timeout=120)
    assert res.code == 0, res.describe()
    return res


def image(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.fixture
def full_repo(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[Path, dict[str, str]]]:
    """A repository on a 12 MiB tmpfs holding one 2 MiB snapshot 'base'."""
    with tmpfs(tmp_path / "fs", "12m") as fs:
        e = {**env, "VMDR_REPO": str(fs / "repo")}
        ok(["repo", "init", "--chunk-size", "128k"], e)
        image(tmp_path / "base.raw", 2 * MIB)
        ok(["image", "backup", str(tmp_path / "base.raw"), "--name", "base"], e)
        yield fs, e


def test_backup_to_a_full_repository(tmp_path: Path, full_repo: tuple[Path, dict[str, str]]
                                     ) -> None:
    _fs, env = full_repo
    image(tmp_path / "big.raw", 32 * MIB)
    res = run_vmdr(["image", "backup", str(tmp_path / "big.raw"), "--name", "big"], env)
    assert_clean_failure(res, 9)
    assert "space" in res.stderr
    assert_only_stale_temps(env, "a full repository", "--read-data")
    names = [s["name"] for s in json.loads(ok(["snapshots", "--json"], env).stdout)]
    assert names == ["base"]
    ok(["image", "restore", "base", str(tmp_path / "base.out")], env)
    assert (tmp_path / "base.out").read_bytes() == (tmp_path / "base.raw").read_bytes()


def test_restore_from_a_repository_full_to_the_last_byte(
        tmp_path: Path, full_repo: tuple[Path, dict[str, str]]) -> None:
    fs, env = full_repo
    fill(fs)
    ok(["snapshots"], env)
    ok(["image", "restore", "base", str(tmp_path / "base.out")], env)
    assert (tmp_path / "base.out").read_bytes() == (tmp_path / "base.raw").read_bytes()


def test_commands_on_a_full_repository_fail_cleanly(
        tmp_path: Path, full_repo: tuple[Path, dict[str, str]]) -> None:
    fs, env = full_repo
    fill(fs)
    for argv in (["image", "backup", str(tmp_path / "base.raw"), "--name", "again",
                  "--force-read"],
                 ["protect", "base"],
                 ["key", "add", "--new-password-file", env["VMDR_PASSWORD_FILE"]]):
        # a warning may say it works without a lock (shared-lock commands) before the error
        assert_clean_failure(run_vmdr(argv, env), 9, strict_one_line=False)
    (fs / "filler").unlink()
    assert_only_stale_temps(env, "commands on a full repository", "--read-data")


@pytest.fixture
def repo(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    e = {**env, "VMDR_REPO": str(tmp_path / "repo")}
    ok(["repo", "init", "--chunk-size", "128k"], e)
    image(tmp_path / "big.raw", 24 * MIB)
    ok(["image", "backup", str(tmp_path / "big.raw"), "--name", "big"], e)
    return e


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_restore_to_a_full_disk(tmp_path: Path, repo: dict[str, str], fmt: str) -> None:
    with tmpfs(tmp_path / "target", "8m") as fs:
        out = fs / f"big.{fmt}"
        res = run_vmdr(["image", "restore", "big", str(out), "--format", fmt], repo)
        assert_clean_failure(res, 9)
        assert not out.exists(), "a partial image is left under the final name"
        assert not list(fs.iterdir()), f"left behind: {list(fs.iterdir())}"
    assert_only_stale_temps(repo, "a restore to a full disk")


def test_restore_force_to_a_full_disk_keeps_the_old_file(tmp_path: Path, repo: dict[str, str]
                                                         ) -> None:
    """Should-fix of issue 14: a failed --force restore keeps the existing target."""
    with tmpfs(tmp_path / "target", "8m") as fs:
        out = fs / "big.raw"
        old = image(out, 1 * MIB)
        res = run_vmdr(["image", "restore", "big", str(out), "--force"], repo)
        assert_clean_failure(res, 9)
        assert out.exists() and out.read_bytes() == old, "the old file was lost"


def test_vm_restore_to_a_full_disk(tmp_path: Path, repo: dict[str, str]) -> None:
    """vmdr restore of an image snapshot is refused before anything is written; the
    full-disk path of restore_vm is the same diskcopy as image restore."""
    with tmpfs(tmp_path / "target", "1m") as fs:
        res = run_vmdr(["restore", "big", "--target-dir", str(fs / "vm")], repo)
        assert_clean_failure(res, 2)
        assert not list(fs.iterdir())


def test_key_export_to_a_full_disk(tmp_path: Path, repo: dict[str, str]) -> None:
    with tmpfs(tmp_path / "target", "64k") as fs:
        fill(fs)
        res = run_vmdr(["key", "export", str(fs / "key")], repo)
        assert_clean_failure(res, 9)
        assert not (fs / "key").exists(), "a truncated key file was left behind"


def test_plan_write_to_a_full_disk(tmp_path: Path, env: dict[str, str]) -> None:
    cfg = tmp_path / "plan.toml"
    cfg.write_text("[locations.a]\nkind = 'building'\nname = 'A'\n[hosts.h]\nlocation = 'a'\n"
                   "[vm.web]\nhost = 'h'\n")
    with tmpfs(tmp_path / "target", "64k") as fs:
        fill(fs)
        res = run_vmdr(["plan", "write", "--offline", "-o", str(fs / "plan.md")],
                       {**env, "VMDR_CONFIG": str(cfg)})
        assert_clean_failure(res, 9)
        assert not (fs / "plan.md").exists(), "a truncated plan was left behind"


def test_cache_on_a_full_disk(tmp_path: Path, repo: dict[str, str]) -> None:
    """The cache is advisory: a full cache disk never stops a backup or a restore."""
    with tmpfs(tmp_path / "cachefs", "64k") as fs:
        fill(fs)
        e = {**repo, "VMDR_CACHE_DIR": str(fs / "cache")}
        res = run_vmdr(["image", "restore", "big", str(tmp_path / "big.out")], e)
        assert res.code == 0 and "Traceback" not in res.stderr, res.describe()
        assert (tmp_path / "big.out").read_bytes() == (tmp_path / "big.raw").read_bytes()
        res = run_vmdr(["image", "backup", str(tmp_path / "big.raw"), "--name", "again",
                        "--force-read"], e)
        assert res.code == 0 and "Traceback" not in res.stderr, res.describe()
