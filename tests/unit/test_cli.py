"""The CLI as a sysadmin sees it: one-line errors, documented exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .repofixtures import make_image

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def run(
    *args: str, env: dict[str, str] | None = None, code: int = 0
) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([*VMDR, *args], capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == code, f"exit {p.returncode} != {code}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    if code:
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("vmdr: error")]
        assert len(lines) == 1, p.stderr
    return p


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "pw"
    pw.write_text("s3cret passphrase\n")
    pw.chmod(0o600)
    env = {"VMDR_REPO": str(tmp_path / "repo"), "VMDR_PASSWORD_FILE": str(pw)}
    run("repo", "init", env=env)
    return env


def test_full_cycle(tmp_path: Path, repo: dict[str, str]) -> None:
    content = make_image(str(tmp_path / "disk.raw"), 9 << 20, seed=3)
    out = json.loads(run("image", "backup", str(tmp_path / "disk.raw"), "--name", "vm1",
                         "--tag", "daily", "--json", env=repo).stdout)
    assert out["bytes_new"] > 0
    out2 = json.loads(run("image", "backup", str(tmp_path / "disk.raw"), "--name", "vm1",
                          "--json", env=repo).stdout)
    assert out2["bytes_new"] == 0
    snaps = json.loads(run("snapshots", "--json", env=repo).stdout)
    assert [s["name"] for s in snaps] == ["vm1", "vm1"]
    assert {"id", "name", "time", "tags"} <= set(snaps[0])
    assert snaps[0]["tags"] == ["daily"]
    run("image", "restore", f"vm1@{snaps[0]['id'][:8]}", str(tmp_path / "o.qcow2"),
        "--format", "qcow2", env=repo)
    run("image", "restore", "vm1", str(tmp_path / "o.raw"), env=repo)
    assert (tmp_path / "o.raw").read_bytes() == content
    # never overwrite without --force
    run("image", "restore", "vm1", str(tmp_path / "o.raw"), env=repo, code=2)
    st = json.loads(run("repo", "stats", "--json", env=repo).stdout)
    assert st["snapshots"] == 2 and st["dedup_ratio"] >= 1.9
    assert {"logical_bytes", "stored_bytes", "dedup_ratio", "compression_ratio"} <= set(st)
    run("check", "--read-data", env=repo)
    run("protect", "vm1@" + snaps[0]["id"][:8], env=repo)
    plan = json.loads(run("forget", "--keep-last", "1", "--dry-run", "--json", env=repo).stdout)
    assert all(d["keep"] for d in plan["decisions"])  # one kept as last, one protected
    run("unprotect", "vm1@" + snaps[0]["id"][:8], env=repo)
    run("forget", "--keep-last", "1", "--prune", env=repo)
    assert len(json.loads(run("snapshots", "--json", env=repo).stdout)) == 1


def test_wrong_password(repo: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    bad.chmod(0o600)
    p = run("snapshots", env={**repo, "VMDR_PASSWORD_FILE": str(bad)}, code=4)
    assert "passphrase" in p.stderr


def test_password_file_must_be_private(repo: dict[str, str]) -> None:
    os.chmod(repo["VMDR_PASSWORD_FILE"], 0o644)
    p = run("snapshots", env=repo, code=2)
    assert "chmod 600" in p.stderr


def test_not_a_repository(tmp_path: Path, repo: dict[str, str]) -> None:
    run("snapshots", env={**repo, "VMDR_REPO": str(tmp_path / "nowhere")}, code=3)
    run("snapshots", env={**repo, "VMDR_REPO": "ftp://x/y"}, code=2)
    run("snapshots", env={k: v for k, v in repo.items() if k != "VMDR_REPO"}, code=2)


def test_newer_format(repo: dict[str, str]) -> None:
    cfg = Path(repo["VMDR_REPO"]) / "vmdr-repo"
    doc = json.loads(cfg.read_text())
    doc["version"] = 99
    cfg.write_text(json.dumps(doc))
    run("snapshots", env=repo, code=7)


def test_locked_repository(repo: dict[str, str]) -> None:
    from vmdr.repository.locks import Lock
    from vmdr.storage.file import FileBackend

    lock = Lock(FileBackend(repo["VMDR_REPO"]), exclusive=True, command="prune").acquire()
    try:
        p = run("image", "backup", "/dev/null", "--name", "x", env=repo, code=5)
        assert "prune" in p.stderr
    finally:
        lock.release()


def test_corrupt_object_and_truncated(tmp_path: Path, repo: dict[str, str]) -> None:
    make_image(str(tmp_path / "d.raw"), 16 << 20, seed=5, pieces=60)
    run("image", "backup", str(tmp_path / "d.raw"), "--name", "vm", env=repo)
    chunks = sorted((Path(repo["VMDR_REPO"]) / "data").rglob("*"))
    files = [c for c in chunks if c.is_file()]
    blob = bytearray(files[0].read_bytes())
    blob[20] ^= 0xFF
    files[0].write_bytes(bytes(blob))
    files[1].write_bytes(files[1].read_bytes()[:10])
    p = run("check", "--read-data", env=repo, code=6)
    assert "corrupt-chunk" in p.stdout and "vm@" in p.stdout
    run("image", "restore", "vm", str(tmp_path / "o.raw"), env=repo, code=6)
    assert not (tmp_path / "o.raw").exists()  # nothing half-restored left behind


def test_unknown_snapshot_and_bad_args(repo: dict[str, str], tmp_path: Path) -> None:
    run("image", "restore", "ghost", str(tmp_path / "x"), env=repo, code=14)
    run("image", "backup", str(tmp_path / "missing.img"), "--name", "x", env=repo, code=2)
    run("forget", env=repo, code=2)
    p = subprocess.run([*VMDR, "image", "backup"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_key_commands(tmp_path: Path, repo: dict[str, str]) -> None:
    kf = tmp_path / "key"
    run("key", "export", str(kf), env=repo)
    assert (kf.stat().st_mode & 0o777) == 0o600
    newpw = tmp_path / "newpw"
    newpw.write_text("brand new\n")
    newpw.chmod(0o600)
    run("key", "passwd", "--new-password-file", str(newpw), env=repo)
    run("snapshots", env=repo, code=4)
    run("snapshots", env={**repo, "VMDR_PASSWORD_FILE": str(newpw)})
    # key file opens it without any passphrase
    env = {k: v for k, v in repo.items() if k != "VMDR_PASSWORD_FILE"}
    run("snapshots", "--key-file", str(kf), env=env)
    run("key", "import", str(kf), "--new-password-file", str(repo["VMDR_PASSWORD_FILE"]),
        env=env)
    run("snapshots", env=repo)
    slots = json.loads(run("key", "list", "--json", env=repo).stdout)
    assert len(slots) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_mid_backup(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        pw = tmp_path / "pw"
        pw.write_text("pw\n")
        pw.chmod(0o600)
        env = {"VMDR_REPO": str(mnt / "repo"), "VMDR_PASSWORD_FILE": str(pw)}
        run("repo", "init", "--chunk-size", "256K", env=env)
        with open(tmp_path / "big.raw", "wb") as f:
            f.write(os.urandom(8 << 20))
        run("image", "backup", str(tmp_path / "big.raw"), "--name", "big", env=env, code=9)
        assert json.loads(run("snapshots", "--json", env=env).stdout) == []
        run("check", env=env)
        # restore into a target dir without space: exit 9, no partial file left
        env2 = {**env, "VMDR_REPO": str(tmp_path / "repo2")}
        run("repo", "init", env=env2)
        run("image", "backup", str(tmp_path / "big.raw"), "--name", "big", env=env2)
        run("image", "restore", "big", str(mnt / "out.raw"), env=env2, code=9)
        assert not (mnt / "out.raw").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_help_everywhere() -> None:
    for args in (["--help"], ["repo", "init", "--help"], ["image", "backup", "--help"],
                 ["forget", "--help"], ["key", "export", "--help"], ["check", "--help"]):
        p = subprocess.run([*VMDR, *args], capture_output=True, text=True)
        assert p.returncode == 0 and "usage: vmdr" in p.stdout
    assert "exit codes" in subprocess.run([*VMDR, "--help"], capture_output=True,
                                          text=True).stdout


def test_killed_mid_backup_leaves_repo_clean(tmp_path: Path, repo: dict[str, str]) -> None:
    """kill -9 mid-write: no snapshot appears, check stays clean, the next run works."""
    import signal
    import time

    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(4 << 20))
    env = dict(os.environ, **repo)
    proc = subprocess.Popen([*VMDR, "image", "backup", str(big), "--name", "big"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = Path(repo["VMDR_REPO"]) / "data"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(data.rglob("*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert json.loads(run("snapshots", "--json", env=repo).stdout) == []
    run("check", "--read-data", env=repo)  # the dead process's lock is stale, not blocking
    run("image", "backup", str(big), "--name", "big", env=repo)
    run("check", "--read-data", env=repo)


def test_unchanged_image_is_not_read_again(tmp_path: Path, repo: dict[str, str]) -> None:
    img = tmp_path / "d.raw"
    make_image(str(img), 6 << 20, seed=8)
    first = json.loads(run("image", "backup", str(img), "--name", "d", "--json", env=repo).stdout)
    assert first["bytes_read"] > 0
    same = json.loads(run("image", "backup", str(img), "--name", "d", "--json", env=repo).stdout)
    assert same["bytes_read"] == 0 and same["bytes_stored"] == 0
    forced = json.loads(run("image", "backup", str(img), "--name", "d", "--force-read", "--json",
                            env=repo).stdout)
    assert forced["bytes_read"] == first["bytes_read"] and forced["bytes_new"] == 0
    with open(img, "r+b") as f:  # a rewrite changes ctime: read again, new data stored
        f.seek(4 << 20)
        f.write(b"changed!" * 512)
    changed = json.loads(run("image", "backup", str(img), "--name", "d", "--json",
                             env=repo).stdout)
    assert changed["bytes_read"] > 0 and changed["bytes_new"] > 0
    run("image", "restore", "d", str(tmp_path / "o.raw"), env=repo)
    assert (tmp_path / "o.raw").read_bytes() == img.read_bytes()
