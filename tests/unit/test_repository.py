"""Repository open/init, keys, snapshots, attachments and bad-input handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmdr.errors import (
    IntegrityError,
    RepositoryExists,
    RepositoryNotFound,
    SnapshotNotFound,
    UnsupportedFormat,
    UsageError,
    WrongPassword,
)
from vmdr.repository.keys import KdfParams
from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot
from vmdr.repository.repo import Repository
from vmdr.storage.file import FileBackend

from .repofixtures import PASS, FakeClock, make_repo, reopen


def test_init_then_open(tmp_path: Path) -> None:
    r = make_repo(str(tmp_path / "r"))
    rid = r.id
    r.close()
    r2 = reopen(str(tmp_path / "r"))
    assert r2.id == rid and r2.encrypted
    assert r2.chunk_size == 64 << 10


def test_init_refuses_existing(tmp_path: Path) -> None:
    make_repo(str(tmp_path / "r")).close()
    with pytest.raises(RepositoryExists):
        make_repo(str(tmp_path / "r"))


def test_wrong_password(tmp_path: Path) -> None:
    make_repo(str(tmp_path / "r")).close()
    with pytest.raises(WrongPassword):
        Repository.open(FileBackend(str(tmp_path / "r")), passphrase=lambda: "nope")


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFound):
        reopen(str(tmp_path / "nothing"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "vmdr-repo").write_text("hello")
    with pytest.raises(RepositoryNotFound):
        reopen(str(tmp_path / "junk"))


def test_newer_format_version_refused(tmp_path: Path) -> None:
    make_repo(str(tmp_path / "r")).close()
    cfg = tmp_path / "r" / "vmdr-repo"
    doc = json.loads(cfg.read_text())
    doc["version"] = 2
    cfg.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormat):
        reopen(str(tmp_path / "r"))


def test_tampered_config_detected(tmp_path: Path) -> None:
    make_repo(str(tmp_path / "r")).close()
    cfg = tmp_path / "r" / "vmdr-repo"
    doc = json.loads(cfg.read_text())
    doc["chunk_size"] = 1 << 20
    cfg.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError):
        reopen(str(tmp_path / "r"))


def test_unencrypted_repository(tmp_path: Path) -> None:
    r = make_repo(str(tmp_path / "r"), encryption="none")
    oid = r.codec.object_id(b"data" * 100)
    r.put_chunk(oid, b"data" * 100)
    assert Repository.open(FileBackend(str(tmp_path / "r"))).get_chunk(oid) == b"data" * 100


def test_key_slots_escrow_and_rotation(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    r = make_repo(path)
    escrow = r.add_key_slot("escrow pass", "escrow", KdfParams.for_tests())
    # change the operator passphrase: new slot, old removed
    old = r.slot
    assert old is not None
    r.add_key_slot("new operator pass", "operator", KdfParams.for_tests())
    r.remove_key_slot(old)
    r.close()
    with pytest.raises(WrongPassword):
        Repository.open(FileBackend(path), passphrase=lambda: PASS)
    assert Repository.open(FileBackend(path), passphrase=lambda: "new operator pass").id
    r2 = Repository.open(FileBackend(path), passphrase=lambda: "escrow pass")
    assert r2.slot == escrow
    with pytest.raises(UsageError):
        r2.remove_key_slot("0000000000000000")


def test_last_slot_cannot_be_removed(tmp_path: Path) -> None:
    r = make_repo(str(tmp_path / "r"))
    assert r.slot is not None
    with pytest.raises(UsageError):
        r.remove_key_slot(r.slot)


def test_key_file_export_import(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    r = make_repo(path)
    kf = r.export_key()
    slot = r.slot
    assert slot is not None
    r.close()
    # lose every passphrase slot: the key file still opens the repository
    os.unlink(os.path.join(path, "keys", slot))
    r2 = Repository.open(FileBackend(path), keyfile=kf)
    r2.add_key_slot("recovered", "operator", KdfParams.for_tests())
    assert Repository.open(FileBackend(path), passphrase=lambda: "recovered").id == r2.id
    other = make_repo(str(tmp_path / "other"))
    with pytest.raises(WrongPassword):
        Repository.open(FileBackend(str(tmp_path / "other")), keyfile=kf)
    assert other.id != r2.id


def _snap(r: Repository, name: str, clock: FakeClock, data: bytes = b"x" * 1000) -> Snapshot:
    oid = r.codec.object_id(data)
    r.put_chunk(oid, data)
    chunks = ChunkList.holes(1)
    chunks[0] = oid
    s = Snapshot(name, clock(), r.chunk_size, [DiskRecord("vda", len(data), chunks)])
    r.save_snapshot(s)
    return s


def test_snapshot_resolution(tmp_path: Path) -> None:
    clock = FakeClock()
    r = make_repo(str(tmp_path / "r"), clock=clock)
    a1 = _snap(r, "web01", clock)
    clock.advance(hours=1)
    a2 = _snap(r, "web01", clock, b"y" * 1000)
    b1 = _snap(r, "db01", clock, b"z" * 1000)
    assert r.resolve("web01").id == a2.id
    assert r.resolve("web01@latest").id == a2.id
    assert r.resolve(f"web01@{a1.id[:8]}").id == a1.id
    assert r.resolve(b1.id[:10]).id == b1.id
    with pytest.raises(SnapshotNotFound):
        r.resolve("nope")
    with pytest.raises(SnapshotNotFound):
        r.resolve("web01@ffffffffff")
    assert [s.id for s in r.list_snapshots("web01")] == [a1.id, a2.id]


def test_snapshot_listing_survives_stale_cache(tmp_path: Path) -> None:
    clock = FakeClock()
    r = make_repo(str(tmp_path / "r"), clock=clock)
    s = _snap(r, "a", clock)
    assert len(r.list_snapshots()) == 1
    # another client deletes the snapshot; our cache must not resurrect it
    FileBackend(str(tmp_path / "r")).delete(f"snapshots/{s.id}")
    assert r.list_snapshots() == []


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    clock = FakeClock()
    r = make_repo(str(tmp_path / "r"), clock=clock)
    _snap(r, "a", clock)
    assert r.cache is not None
    cache_path = r.cache.path
    r.close()
    with open(cache_path, "wb") as f:
        f.write(b"this is not sqlite" * 100)
    r2 = reopen(str(tmp_path / "r"))
    assert [s.name for s in r2.list_snapshots()] == ["a"]


def test_corrupted_manifest_never_returned(tmp_path: Path) -> None:
    clock = FakeClock()
    r = make_repo(str(tmp_path / "r"), clock=clock)
    s = _snap(r, "a", clock)
    r.close()
    p = tmp_path / "r" / "snapshots" / s.id
    blob = bytearray(p.read_bytes())
    blob[-3] ^= 1
    p.write_bytes(bytes(blob))
    r2 = Repository.open(FileBackend(str(tmp_path / "r")), passphrase=lambda: PASS,
                         use_cache=False)
    with pytest.raises(IntegrityError):
        r2.load_snapshot(s.id)


def test_attachments_and_protection(tmp_path: Path) -> None:
    clock = FakeClock()
    r = make_repo(str(tmp_path / "r"), clock=clock)
    s = _snap(r, "a", clock)
    assert not r.is_protected(s.id)
    r.set_protected(s.id, True)
    assert r.is_protected(s.id)
    clock.advance(seconds=5)
    r.set_protected(s.id, False)
    assert not r.is_protected(s.id)
    r.add_attachment(s.id, {"kind": "verification", "status": "passed"})
    assert r.attachments(s.id, "verification")[0]["status"] == "passed"
    r.delete_snapshot(s.id)
    assert list(r.backend.list(f"attachments/{s.id}")) == []
