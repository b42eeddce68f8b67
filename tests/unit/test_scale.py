"""The mechanisms that keep maintenance memory flat at a million chunks (bench/scale.py):
on-disk ID tables, header-only snapshot listings, sharded chunk listings, and check /
prune / copy built on them."""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmdr.jobs.copy import copy_snapshots
from vmdr.repository import idset
from vmdr.repository.check import check
from vmdr.repository.crypto import HOLE
from vmdr.repository.idset import IdTable
from vmdr.repository.keys import KdfParams
from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot, UnloadedChunks
from vmdr.repository.prune import prune
from vmdr.repository.repo import Repository, chunk_name
from vmdr.repository.writer import DiskWriter
from vmdr.storage.file import FileBackend

from .repofixtures import SMALL_CHUNK, make_repo, reopen


def _ids(n: int) -> list[bytes]:
    return [secrets.token_bytes(32) for _ in range(n)]


# ------------------------------------------------------------------ IdTable
def test_idtable_set_and_map_semantics_across_batches() -> None:
    ids = _ids(5000)  # more than one write batch
    with IdTable() as t:
        path = t.path
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        t.add_many(ids[:3000])
        t.add_many(ids[:10])  # repeats are ignored
        for i, oid in enumerate(ids[3000:]):
            t.add(oid, i)
        assert ids[4999] in t  # visible while still buffered
        assert t.get(ids[3001]) == 1
        assert t.get(ids[0]) is None
        assert len(t) == 5000
        assert list(t) == sorted(ids)  # ascending, flushed
        assert t.total() == sum(range(2000))
        t.add(ids[3001], 100)  # replace a value
        assert t.get(ids[3001]) == 100
        assert secrets.token_bytes(32) not in t
        with pytest.raises(KeyError):
            t.get(b"\x00" * 31 + b"\x01")
        with IdTable() as other:
            other.add_many(ids[2:])
            assert t.missing_from(other) == sorted(ids[:2])
            assert other.missing_from(t) == []
    assert not os.path.exists(path)  # the temporary file is gone


def test_idtable_blob_values() -> None:
    a, b = _ids(2)
    with IdTable() as t:
        t.add(a, b)
        t.flush()
        assert t.get(a) == b


# ------------------------------------------------------------------ a synthetic repository
def _synthetic(repo: Repository, pool: int, snaps: int, refs: int) -> list[bytes]:
    """*pool* tiny chunks; *snaps* manifests of *refs* references each (with a hole and
    repeats), like bench/scale.py's generator."""
    ids = []
    for i in range(pool):
        payload = i.to_bytes(4, "little") + secrets.token_bytes(4)
        oid = repo.codec.object_id(payload)
        repo.put_chunk(oid, payload)
        ids.append(oid)
    for k in range(snaps):
        cl = ChunkList(b"".join(HOLE if j == 3 else ids[(k * 7 + j) % pool]
                                for j in range(refs)))
        disk = DiskRecord(name="vda", size=refs * repo.chunk_size, chunks=cl)
        repo.save_snapshot(Snapshot(name=f"vm{k % 2}", disks=[disk], chunk_size=repo.chunk_size,
                                    time=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=k)))
    return ids


def test_header_only_listing_refuses_chunk_access(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    _synthetic(repo, 20, 3, 30)
    full = repo.list_snapshots()
    heads = repo.list_snapshots(chunks=False)
    assert [s.id for s in heads] == [s.id for s in full]
    assert [s.summary() for s in heads] == [s.summary() for s in full]
    d = heads[0].disks[0]
    assert isinstance(d.chunks, UnloadedChunks)
    for use in (lambda: list(d.chunks), lambda: len(d.chunks), lambda: d.chunks[0],
                lambda: d.chunks.ids(), lambda: d.chunks.tobytes()):
        with pytest.raises(RuntimeError, match="not loaded"):
            use()
    # resolve() decides on headers and returns the whole snapshot
    assert repo.resolve(full[-1].id[:12]).disks[0].chunks == full[-1].disks[0].chunks


def test_list_chunks_covers_every_shard(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    ids = _synthetic(repo, 600, 1, 5)  # 600 random IDs fall in most of the 256 shards
    listed = [bytes.fromhex(o.name.rsplit("/", 1)[-1]) for o in repo.list_chunks()]
    assert sorted(listed) == sorted(ids)
    assert len({o.hex()[:2] for o in ids}) > 200


# ------------------------------------------------------------------ check
def test_check_names_damaged_snapshots_in_a_second_pass(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    repo = make_repo(path)
    ids = _synthetic(repo, 50, 4, 40)
    snaps = repo.list_snapshots()
    gone, bad = ids[10], ids[20]
    os.unlink(os.path.join(path, chunk_name(gone)))
    p = Path(path, chunk_name(bad))
    blob = bytearray(p.read_bytes())
    blob[-1] ^= 1
    p.write_bytes(bytes(blob))

    def users(oid: bytes) -> list[str]:  # the old in-memory way, as the oracle
        return [f"{s.name}@{s.short_id}:vda" for s in sorted(snaps, key=lambda s: s.id)
                if oid in s.disks[0].chunks.ids()]

    res = check(reopen(path))
    assert res.chunks_referenced == 50 and res.snapshots == 4
    assert [(p.kind, p.object) for p in res.problems] == [("missing-chunk", chunk_name(gone))]
    assert sorted(res.problems[0].damages) == sorted(users(gone))
    assert len(res.problems[0].damages) == len(set(res.problems[0].damages))  # once each
    res = check(reopen(path), read_data=1.0, workers=2)
    assert res.chunks_read == 49
    got = {(p.kind, p.object): sorted(p.damages) for p in res.problems}
    assert got == {("missing-chunk", chunk_name(gone)): sorted(users(gone)),
                   ("corrupt-chunk", chunk_name(bad)): sorted(users(bad))}


def test_check_does_not_fill_the_cache(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    repo = make_repo(path)
    _synthetic(repo, 10, 2, 10)
    fresh = reopen(path)
    assert fresh.cache is not None
    fresh.cache.forget_snapshots(set())  # an empty snapshot cache
    assert check(fresh).ok
    assert all(fresh.cache.get_snapshot(sid) is None for sid in fresh.snapshot_ids())


# ------------------------------------------------------------------ prune
def test_prune_with_more_deletions_than_a_batch(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idset, "_BATCH", 16)  # many batches without thousands of files
    path = str(tmp_path / "r")
    repo = make_repo(path)
    ids = _synthetic(repo, 300, 1, 101)  # 100 distinct chunks and one hole
    res = prune(repo, timedelta(0))
    assert res.referenced == 100 and res.deleted == 200
    kept = {bytes.fromhex(o.name.rsplit("/", 1)[-1]) for o in repo.list_chunks()}
    assert kept == set(ids[:101]) - {ids[3]}
    assert repo.cache is not None
    assert not any(repo.cache.has_chunk(oid) for oid in ids[101:])  # forgot every deleted
    assert check(reopen(path)).ok


# ------------------------------------------------------------------ copy
def test_copy_sends_each_shared_chunk_once(tmp_path: Path) -> None:
    src = make_repo(str(tmp_path / "src"))
    ids = _synthetic(src, 30, 5, 40)  # the five manifests overlap, and repeat chunks
    dst = Repository.init(FileBackend(str(tmp_path / "dst")), passphrase="x", master=src.key,
                          chunk_size=src.chunk_size, kdf=KdfParams.for_tests())
    res = copy_snapshots(src, dst)
    assert res.mode == "raw" and len(res.copied) == 5
    assert res.chunks_sent == 30 and res.chunks_present == 0
    assert sum(s.chunks_sent for s in res.snapshots) == 30
    assert {s.id for s in dst.list_snapshots()} == {s.id for s in src.list_snapshots()}
    assert sorted(bytes.fromhex(o.name[-64:]) for o in dst.list_chunks()) == sorted(ids)
    assert check(dst, read_data=1.0).ok
    again = copy_snapshots(src, dst)
    assert again.copied == [] and again.chunks_sent == 0


def test_copy_reencrypting_maps_every_reference(tmp_path: Path) -> None:
    src = make_repo(str(tmp_path / "src"))
    _synthetic(src, 25, 3, 30)
    dst = make_repo(str(tmp_path / "dst"), chunk_size=SMALL_CHUNK)
    res = copy_snapshots(src, dst)
    assert res.mode == "re-encrypt" and res.chunks_sent == 25
    for s in src.list_snapshots():
        copied = next(d for d in dst.list_snapshots()
                      if d.meta["copied_from"]["snapshot"] == s.id)
        a, b = s.disks[0].chunks, copied.disks[0].chunks
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert (x == HOLE) == (y == HOLE)
            if x != HOLE:
                assert src.get_chunk(x) == dst.get_chunk(y)


def test_writer_still_round_trips(tmp_path: Path) -> None:
    """The view-based chunk-list decode keeps manifests byte-identical."""
    repo = make_repo(str(tmp_path / "r"))
    w = DiskWriter(repo, "d", 4 * SMALL_CHUNK)
    w.write(0, os.urandom(SMALL_CHUNK))
    rec = w.finish()
    sid = repo.save_snapshot(Snapshot(name="x", time=datetime(2026, 1, 1, tzinfo=UTC),
                                      chunk_size=SMALL_CHUNK, disks=[rec]))
    assert reopen(str(tmp_path / "r")).load_snapshot(sid).disks[0].chunks == rec.chunks
