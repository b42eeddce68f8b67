"""``vmdr copy`` and friends on local file repositories: raw (shared key) and re-encrypting
copies, resume after interruption, attachments, the bandwidth limiter, append-only mode
and the S3 Object Lock headers (botocore Stubber, no server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmdr.errors import AppendOnlyViolation, StorageError, UsageError
from vmdr.jobs import diskcopy
from vmdr.jobs.copy import CopyOptions, copy_snapshots, select, shares_key
from vmdr.jobs.image import backup_image
from vmdr.repository.keys import KdfParams
from vmdr.repository.prune import prune
from vmdr.repository.repo import Repository
from vmdr.storage.appendonly import AppendOnlyBackend
from vmdr.storage.base import Backend
from vmdr.storage.faulty import Fault, FaultyBackend
from vmdr.storage.file import FileBackend
from vmdr.storage.throttle import ThrottlingBackend, TokenBucket, parse_rate

from .repofixtures import PASS, SMALL_CHUNK, make_image, make_repo, reopen

SIZE = 1 << 20  # 16 chunks of 64 KiB


def data_names(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in (path / "data").rglob("*") if p.is_file()}


def files(path: Path, sub: str) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes()
            for p in (path / sub).rglob("*") if p.is_file()}


@pytest.fixture
def src(tmp_path: Path) -> Repository:
    repo = make_repo(str(tmp_path / "src"))
    for i, (name, seed) in enumerate([("vm1", 1), ("vm1", 2), ("vm2", 3)]):
        img = tmp_path / f"{name}-{i}.raw"
        make_image(str(img), SIZE, seed=seed)
        snap = backup_image(repo, str(img), name, workers=2).snapshot
        if i == 0:
            repo.set_protected(snap.id, True)
            repo.add_attachment(snap.id, {"kind": "verification", "ok": True, "boot_s": 3.5})
    return repo


def restore_all(repo: Repository, tmp_path: Path, tag: str) -> dict[str, bytes]:
    out = {}
    for s in repo.list_snapshots():
        p = tmp_path / f"restore-{tag}-{s.id[:8]}"
        diskcopy.restore(repo, s.disks[0], str(p))
        out[f"{s.name}@{s.time.isoformat()}"] = p.read_bytes()
    return out


def shared_dst(src: Repository, path: Path) -> Repository:
    return Repository.init(FileBackend(str(path)), passphrase="other pass", master=src.key,
                           chunk_size=src.chunk_size, kdf=KdfParams.for_tests())


# -- modes ------------------------------------------------------------------------------


def test_reencrypting_copy_restores_byte_exact_and_is_idempotent(
        src: Repository, tmp_path: Path) -> None:
    dst = make_repo(str(tmp_path / "dst"))
    assert not shares_key(src, dst)
    res = copy_snapshots(src, dst, CopyOptions(workers=3))
    assert res.mode == "re-encrypt" and len(res.copied) == 3 and res.chunks_sent > 0
    assert restore_all(dst, tmp_path, "d") == restore_all(src, tmp_path, "s")
    # different keys: no stored object is the same, IDs differ, provenance recorded
    assert not set(files(tmp_path / "src", "data")) & set(files(tmp_path / "dst", "data"))
    for s in dst.list_snapshots():
        assert s.meta["copied_from"]["repository"] == src.id
    again = copy_snapshots(src, dst)
    assert again.chunks_sent == 0 and not again.copied and again.attachments_copied == 0


def test_shared_key_copy_moves_stored_bytes_unchanged(src: Repository, tmp_path: Path) -> None:
    dst = shared_dst(src, tmp_path / "dst")
    assert dst.id != src.id and shares_key(src, dst)
    res = copy_snapshots(src, dst)
    assert res.mode == "raw" and len(res.copied) == 3
    for sub in ("data", "snapshots", "attachments"):
        assert files(tmp_path / "dst", sub) == files(tmp_path / "src", sub)
    assert [s.id for s in dst.list_snapshots()] == [s.id for s in src.list_snapshots()]
    assert restore_all(dst, tmp_path, "d") == restore_all(src, tmp_path, "s")


@pytest.mark.parametrize("enc_src,enc_dst", [("none", "aes-256-gcm"), ("aes-256-gcm", "none")])
def test_unencrypted_and_encrypted_mix(tmp_path: Path, enc_src: str, enc_dst: str) -> None:
    s = make_repo(str(tmp_path / "s"), encryption=enc_src)
    make_image(str(tmp_path / "a.raw"), SIZE, seed=9)
    backup_image(s, str(tmp_path / "a.raw"), "img")
    d = make_repo(str(tmp_path / "d"), encryption=enc_dst)
    assert copy_snapshots(s, d).mode == "re-encrypt"
    assert restore_all(d, tmp_path, "d") == restore_all(s, tmp_path, "s")


def test_chunk_size_mismatch_is_refused(src: Repository, tmp_path: Path) -> None:
    dst = make_repo(str(tmp_path / "dst"), chunk_size=2 * SMALL_CHUNK)
    with pytest.raises(UsageError, match="chunk sizes differ"):
        copy_snapshots(src, dst)
    with pytest.raises(UsageError, match="same repository"):
        copy_snapshots(src, reopen(str(tmp_path / "src")))


def test_selection_by_name_glob_ref_and_latest(src: Repository, tmp_path: Path) -> None:
    assert [s.name for s in select(src, ["vm1"], None)] == ["vm1", "vm1"]
    assert [s.name for s in select(src, ["vm*"], 1)] == ["vm1", "vm2"]
    last = src.list_snapshots("vm1")[-1]
    # select() returns headers (chunk lists are loaded when copied): same snapshot = same
    # content-addressed ID
    assert [s.id for s in select(src, ["vm1"], 1)] == [last.id]
    assert [s.id for s in select(src, [f"vm1@{last.id[:8]}"], None)] == [last.id]
    assert [s.id for s in select(src, [last.id[:10]], None)] == [last.id]
    with pytest.raises(Exception, match="no snapshot matches 'nomatch\\*'"):
        select(src, ["nomatch*"], None)  # a glob typo is an error, not "nothing to copy"
    with pytest.raises(Exception, match="no snapshot named"):
        select(src, ["vm9"], None)
    dst = make_repo(str(tmp_path / "dst"))
    res = copy_snapshots(src, dst, CopyOptions(names=["vm1"], latest=1))
    assert [s.source_id for s in res.copied] == [last.id]
    assert len(dst.list_snapshots()) == 1


# -- resume and atomicity ---------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_interrupted_copy_resumes_without_resending(
        src: Repository, tmp_path: Path, shared: bool) -> None:
    path = tmp_path / "dst"
    first = shared_dst(src, path) if shared else make_repo(str(path))
    first.close()
    faulty = FaultyBackend(FileBackend(str(path)))
    faulty.add(Fault("put", "data/*", StorageError("link down"), after=10))
    dst = Repository.open(faulty, passphrase=lambda: "other pass" if shared else PASS)
    with pytest.raises(StorageError, match="link down"):
        copy_snapshots(src, dst, CopyOptions(workers=2))
    dst.close()
    arrived = data_names(path)
    assert 10 <= len(arrived) < len(data_names(tmp_path / "src"))
    assert not list((path / "snapshots").glob("*"))  # nothing half-copied is visible
    again = FaultyBackend(FileBackend(str(path)))
    dst2 = Repository.open(again, passphrase=lambda: "other pass" if shared else PASS)
    res = copy_snapshots(src, dst2, CopyOptions(workers=2))
    resent = {n for m, n in again.calls if m == "put" and n.startswith("data/")}
    assert resent and not resent & arrived
    assert res.chunks_present >= len(arrived)
    assert len(data_names(path)) == len(arrived) + len(resent)
    assert restore_all(dst2, tmp_path, "d") == restore_all(src, tmp_path, "s")
    if not shared:  # remembered translations: no source chunk downloaded twice
        src_faulty = FaultyBackend(FileBackend(str(tmp_path / "src")))
        src2 = Repository.open(src_faulty, passphrase=lambda: PASS)
        copy_snapshots(src2, dst2)
        assert not [c for c in src_faulty.calls if c[0] == "get" and c[1].startswith("data/")]


def test_snapshot_appears_only_when_complete(src: Repository, tmp_path: Path) -> None:
    path = tmp_path / "dst"
    make_repo(str(path)).close()
    seen: list[int] = []
    faulty = FaultyBackend(FileBackend(str(path)))
    dst = Repository.open(faulty, passphrase=lambda: PASS)

    def on_manifest(name: str) -> None:  # every chunk of that snapshot is already stored
        if name.startswith("snapshots/"):
            seen.append(len(data_names(path)))

    faulty.add(Fault("put", "snapshots/*", callback=on_manifest))
    copy_snapshots(src, dst, CopyOptions(names=["vm2"]))
    snap = src.list_snapshots("vm2")[0]
    assert seen == [len(snap.disks[0].chunks.ids())]


# -- attachments ------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_attachments_travel_and_sync_later(src: Repository, tmp_path: Path, shared: bool) -> None:
    dst = shared_dst(src, tmp_path / "dst") if shared else make_repo(str(tmp_path / "dst"))
    res = copy_snapshots(src, dst)
    assert res.attachments_copied == 2
    first = res.snapshots[0]
    assert dst.is_protected(first.id)
    ver = dst.attachments(first.id, "verification")
    assert ver and ver[-1]["boot_s"] == 3.5 and ver[-1]["snapshot"] == first.id
    src.set_protected(first.source_id, False)  # changed after the copy: follows next time
    res2 = copy_snapshots(src, dst)
    assert res2.attachments_copied == 1 and not dst.is_protected(first.id)


# -- bandwidth limit --------------------------------------------------------------------


def test_token_bucket_average_rate() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    tb = TokenBucket(1000 * 1024, burst=100 * 1024, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        tb.take(64 * 1024)  # 3.2 MiB total, minus the burst
    assert now[0] == pytest.approx((50 * 64 - 100) / 1000, rel=0.01)
    assert parse_rate("10M") == 10 << 20 and parse_rate("512k") == 512 << 10
    assert parse_rate("1.5MiB/s") == int(1.5 * (1 << 20))
    for bad in ("fast", "10", "0M"):
        with pytest.raises(UsageError):
            parse_rate(bad)


def test_throttling_backend_charges_data_bytes(tmp_path: Path) -> None:
    taken: list[int] = []

    class Rec(TokenBucket):
        def take(self, n: int) -> float:
            taken.append(n)
            return 0.0

    b = ThrottlingBackend(FileBackend(str(tmp_path)), Rec(1 << 20))
    b.create()
    b.put("data/x", b"12345")
    assert b.get("data/x") == b"12345" and b.get_range("data/x", 1, 2) == b"23"
    b.stat("data/x")
    list(b.list("data"))
    assert taken == [5, 5, 2]


# -- append-only ------------------------------------------------------------------------


def test_append_only_refuses_deletes_and_replacements(src: Repository, tmp_path: Path) -> None:
    ao = AppendOnlyBackend(FileBackend(str(tmp_path / "src")))
    repo = Repository.open(ao, passphrase=lambda: PASS)
    sid = repo.list_snapshots()[0].id
    with pytest.raises(AppendOnlyViolation, match="refusing to delete"):
        repo.delete_snapshot(sid)
    assert len(repo.list_snapshots()) == 3 and repo.attachments(sid)
    orphan = b"unreferenced" * 100
    repo.put_chunk(repo.codec.object_id(orphan), orphan)  # new objects are fine
    with pytest.raises(AppendOnlyViolation):
        prune(repo, timedelta(0))
    with pytest.raises(AppendOnlyViolation, match="refusing to replace vmdr-repo"):
        ao.put("vmdr-repo", b"{}")
    new_slot = repo.add_key_slot("another", "escrow", KdfParams.for_tests())  # adding is fine
    with pytest.raises(AppendOnlyViolation):
        repo.remove_key_slot(new_slot)
    # content-addressed re-put is a quiet no-op; new objects and locks work
    name = next(iter(data_names(tmp_path / "src")))
    before = (tmp_path / "src" / name).read_bytes()
    ao.put(name, b"garbage")
    assert (tmp_path / "src" / name).read_bytes() == before
    with repo.lock(exclusive=False, command="t"):
        pass
    assert not list((tmp_path / "src" / "locks").iterdir())
    img = tmp_path / "new.raw"
    make_image(str(img), SIZE, seed=42)
    backup_image(repo, str(img), "vm3")
    assert len(repo.list_snapshots()) == 4


# -- S3 Object Lock headers (no server) -------------------------------------------------


def test_object_lock_headers_are_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.stub import ANY, Stubber

    from vmdr.storage import objectlock
    from vmdr.storage.s3 import S3Backend

    for var, val in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                     "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"
                     }.items():
        monkeypatch.setenv(var, val)
    s3 = S3Backend("bkt", "repo", endpoint="http://127.0.0.1:1", path_style=True)
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    locked = objectlock.ObjectLockBackend(s3, objectlock.Retention("COMPLIANCE", 30), lambda: now)
    with Stubber(s3._s3) as stub:
        stub.add_response("put_object", {}, {
            "Bucket": "bkt", "Key": "repo/data/ab/abcd", "Body": b"chunk", "ContentMD5": ANY,
            "ObjectLockMode": "COMPLIANCE",
            "ObjectLockRetainUntilDate": now + timedelta(days=30)})
        stub.add_response("put_object", {}, {
            "Bucket": "bkt", "Key": "repo/locks/1234", "Body": b"{}", "ContentMD5": ANY})
        stub.add_response("get_object_lock_configuration",
                          {"ObjectLockConfiguration": {"ObjectLockEnabled": "Enabled"}},
                          {"Bucket": "bkt"})
        stub.add_client_error("get_object_lock_configuration",
                              "ObjectLockConfigurationNotFoundError", http_status_code=404)
        locked.put("data/ab/abcd", b"chunk")
        locked.put("locks/1234", b"{}")  # locks stay deletable: no retention
        assert objectlock.bucket_lock_enabled(s3) is True
        with pytest.raises(UsageError, match="does not have S3 Object Lock"):
            objectlock.prepare_bucket(s3)
        stub.assert_no_pending_responses()
    with pytest.raises(UsageError):
        objectlock.Retention("FOREVER", 3)
    with pytest.raises(UsageError, match="needs an S3 repository"):
        objectlock.prepare_bucket(FileBackend("/tmp"))


def test_object_lock_setting_is_read_from_config(tmp_path: Path) -> None:
    from vmdr.storage.objectlock import Retention, configured_retention, with_object_lock

    b: Backend = FileBackend(str(tmp_path))
    repo = Repository.init(b, passphrase=PASS, kdf=KdfParams.for_tests(),
                           extra_config={"object_lock": {"mode": "GOVERNANCE", "days": 7}})
    assert configured_retention(b) == Retention("GOVERNANCE", 7)
    reopen(str(tmp_path)).close()  # the MAC covers the extra field
    with pytest.raises(UsageError, match="needs an S3 repository"):
        with_object_lock(b)
    repo.close()


# -- the command line -------------------------------------------------------------------


def run(*args: str, env: dict[str, str], code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", *args], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=120)
    assert p.returncode == code, f"exit {p.returncode} != {code}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    if code:
        assert len([ln for ln in p.stderr.splitlines() if ln.startswith("vmdr: error")]) == 1
    return p


def test_cli_copy_from_repo_and_append_only(tmp_path: Path) -> None:
    pw, pw2 = tmp_path / "pw", tmp_path / "pw2"
    pw.write_text("source pass\n")
    pw2.write_text("offsite pass\n")
    pw.chmod(0o600)
    pw2.chmod(0o600)
    env = {"VMDR_REPO": str(tmp_path / "src"), "VMDR_PASSWORD_FILE": str(pw)}
    run("repo", "init", "--chunk-size", "64K", env=env)
    make_image(str(tmp_path / "a.raw"), SIZE, seed=5)
    run("image", "backup", str(tmp_path / "a.raw"), "--name", "web", env=env)
    run("image", "backup", str(tmp_path / "a.raw"), "--name", "web", env=env)
    # a destination sharing the key, with its own passphrase
    env2 = {"VMDR_REPO": str(tmp_path / "off"), "VMDR_PASSWORD_FILE": str(pw2),
            "VMDR_FROM_PASSWORD_FILE": str(pw)}
    info = json.loads(run("repo", "init", "--from-repo", str(tmp_path / "src"), "--json",
                          env=env2).stdout)
    assert info["chunk_size"] == 64 << 10
    out = json.loads(run("copy", "--to", str(tmp_path / "off"), "--to-password-file", str(pw2),
                         "--json", env=env).stdout)
    assert out["mode"] == "raw" and out["copied"] == 2
    # a re-encrypting destination with a different chunk size is refused (exit 2)
    env3 = {"VMDR_REPO": str(tmp_path / "small"), "VMDR_PASSWORD_FILE": str(pw)}
    run("repo", "init", "--chunk-size", "128K", env=env3)
    p = run("copy", "--to", str(tmp_path / "small"), env=env, code=2)
    assert "chunk sizes differ" in p.stderr
    # append-only: forget fails with exit 8 and removes nothing
    p = run("forget", "--keep-last", "1", "--append-only", env=env2, code=8)
    assert "append-only" in p.stderr
    snaps = json.loads(run("snapshots", "--json", env=env2).stdout)
    assert len(snaps) == 2
    run("image", "restore", "web", str(tmp_path / "r.raw"), env=env2)
    assert (tmp_path / "r.raw").read_bytes() == (tmp_path / "a.raw").read_bytes()


def test_append_only_from_config_env_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from vmdr import config
    from vmdr.cli.common import Globals
    from vmdr.errors import ConfigError

    assert config.parse({"append_only": True}).append_only
    assert not config.parse({}).append_only
    with pytest.raises(ConfigError, match="append_only: expected true or false"):
        config.parse({"append_only": "yes"})
    assert not Globals.from_args(argparse.Namespace()).append_only
    assert Globals.from_args(argparse.Namespace(append_only=True)).append_only
    monkeypatch.setenv("VMDR_APPEND_ONLY", "1")
    assert Globals.from_args(argparse.Namespace()).append_only
