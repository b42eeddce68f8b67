"""File-level restore (``vmdr files``, ``vmdr mount``) on images built here: GPT + xfs,
a whole-disk ext4 without a partition table, and an unformatted partition. No VM needed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdr.jobs.mount import state_path

from .vmtools import repo_env, vmdr

MIB = 1 << 20
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nbdfuse") or not shutil.which("nbdkit"),
    reason="needs root, nbdfuse (libnbd-bin) and nbdkit")


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def _loop(image: Path, offset: int, size: int) -> Iterator[str]:
    dev = _sh("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit",
              str(size), str(image))
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _fill(dev: str, mnt: Path, files: dict[str, bytes]) -> None:
    mnt.mkdir(exist_ok=True)
    _sh("mount", dev, str(mnt))
    try:
        for rel, data in files.items():
            p = mnt / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        os.symlink("/etc/passwd", mnt / "escape")  # absolute: resolves inside the guest
        os.symlink("../hello.txt", mnt / "docs" / "hello-link")
    finally:
        _sh("umount", str(mnt))


FILES = {"hello.txt": b"hello from xfs\n", "docs/deep/report.bin": os.urandom(3 * MIB + 5)}


@pytest.fixture(scope="module")
def gpt_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A repository holding a GPT disk: p1 xfs with FILES, p2 unformatted."""
    tmp = tmp_path_factory.mktemp("files")
    env = repo_env(tmp)
    img = tmp / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(400 * MIB)
    subprocess.run(["sfdisk", "-q", str(img)], input="label: gpt\nsize=320MiB\n,\n", text=True,
                   check=True)
    with _loop(img, MIB, 320 * MIB) as dev:
        _sh("mkfs.xfs", "-q", dev)
        _fill(dev, tmp / "mnt", FILES)
    vmdr(env, "image", "backup", str(img), "--name", "gpt")
    env["TMP"] = str(tmp)
    return env


def test_partitions_gpt_xfs(gpt_repo: dict[str, str]) -> None:
    res = json.loads(vmdr(gpt_repo, "files", "partitions", "gpt", "--json").stdout)
    parts = {p["number"]: p for p in res["partitions"]}
    assert parts[1]["fstype"] == "xfs" and parts[1]["start"] == MIB
    assert parts[2]["fstype"] is None


def test_get_file_from_xfs_on_gpt(gpt_repo: dict[str, str], tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    vmdr(gpt_repo, "files", "get", "gpt", "/docs/deep/report.bin", str(dest))
    assert hashlib.sha256(dest.read_bytes()).digest() == \
        hashlib.sha256(FILES["docs/deep/report.bin"]).digest()
    ls = json.loads(vmdr(gpt_repo, "files", "ls", "gpt", "--partition", "1", "/",
                         "--json").stdout)
    names = {e["name"]: e for e in ls["entries"]}
    assert ls["fstype"] == "xfs" and names["docs"]["type"] == "dir"
    assert names["escape"] == {**names["escape"], "type": "link", "target": "/etc/passwd"}
    # a directory tree: symlinks stay links
    vmdr(gpt_repo, "files", "get", "gpt", "docs", str(tmp_path))
    assert os.readlink(tmp_path / "docs" / "hello-link") == "../hello.txt"
    assert (tmp_path / "docs" / "deep" / "report.bin").stat().st_size == 3 * MIB + 5


def test_guest_symlinks_stay_inside(gpt_repo: dict[str, str], tmp_path: Path) -> None:
    """/escape -> /etc/passwd means the guest's /etc/passwd, which does not exist."""
    p = vmdr(gpt_repo, "files", "get", "gpt", "/escape", str(tmp_path / "x"), code=2)
    assert "no such file" in p.stderr and not (tmp_path / "x").exists()
    vmdr(gpt_repo, "files", "get", "gpt", "/docs/hello-link", str(tmp_path / "h"))
    assert (tmp_path / "h").read_bytes() == FILES["hello.txt"]


def test_unsupported_partition_one_line(gpt_repo: dict[str, str], tmp_path: Path) -> None:
    p = vmdr(gpt_repo, "files", "ls", "gpt", "--partition", "2", "/", code=2)
    assert p.stderr.count("\n") == 1 and "partition 2 has no filesystem" in p.stderr
    p = vmdr(gpt_repo, "files", "ls", "gpt", "--partition", "7", "/", code=2)
    assert p.stderr.count("\n") == 1 and "no partition 7" in p.stderr
    p = vmdr(gpt_repo, "files", "get", "gpt", "/nope", str(tmp_path), code=2)
    assert p.stderr.count("\n") == 1


def test_mount_umount(gpt_repo: dict[str, str], tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    vmdr(gpt_repo, "mount", "gpt", str(mnt))
    try:
        assert (mnt / "hello.txt").read_bytes() == FILES["hello.txt"]
        with pytest.raises(OSError):
            (mnt / "new").write_text("x")  # read-only
        p = vmdr(gpt_repo, "mount", "gpt", str(mnt), code=2)
        assert "already" in p.stderr
        user = subprocess.Popen(["sleep", "60"], cwd=mnt)  # keeps the mount busy
        try:
            p = vmdr(gpt_repo, "umount", str(mnt), code=1)
            assert "busy" in p.stderr and (mnt / "hello.txt").exists()
        finally:
            user.kill()
            user.wait()
    finally:
        vmdr(gpt_repo, "umount", str(mnt))
    assert not os.path.ismount(mnt) and not list(mnt.iterdir())
    assert not os.path.exists(state_path(str(mnt)))
    p = vmdr(gpt_repo, "umount", str(mnt), code=2)
    assert "no vmdr mount" in p.stderr
    # an error in the background holder comes back as one line with its exit code
    p = vmdr(gpt_repo, "mount", "gpt", "--partition", "2", str(mnt), code=2)
    assert p.stderr.count("\n") == 1 and "partition 2 has no filesystem" in p.stderr
    assert not os.path.ismount(mnt)


def test_whole_disk_ext4(tmp_path: Path) -> None:
    """No partition table: the disk is one filesystem ("partition 0")."""
    env = repo_env(tmp_path)
    img = tmp_path / "plain.img"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    _sh("mkfs.ext4", "-q", "-F", str(img))
    with _loop(img, 0, 32 * MIB) as dev:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        _sh("mount", dev, str(mnt))
        (mnt / "a.txt").write_text("whole disk\n")
        _sh("umount", str(mnt))
    vmdr(env, "image", "backup", str(img), "--name", "plain")
    vmdr(env, "files", "get", "plain", "a.txt", str(tmp_path / "a"))
    assert (tmp_path / "a").read_text() == "whole disk\n"
