"""Retention, prune (incl. racing a backup), locks and check."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmdr.errors import RepositoryLocked, UsageError
from vmdr.jobs import diskcopy
from vmdr.repository import locks, retention
from vmdr.repository.check import check
from vmdr.repository.manifest import ChunkList, Snapshot
from vmdr.repository.prune import prune
from vmdr.repository.repo import Repository, chunk_name
from vmdr.repository.writer import DiskWriter
from vmdr.storage.file import FileBackend

from .repofixtures import SMALL_CHUNK, FakeClock, make_image, make_repo, reopen


def _snap(name: str, t: datetime, tags: list[str] | None = None) -> Snapshot:
    s = Snapshot(name, t, 65536, tags=tags or [])
    s.id = f"{name}-{t.isoformat()}"
    return s


def test_retention_buckets() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    snaps = [_snap("a", start + timedelta(hours=6 * i)) for i in range(60)]  # 15 days
    now = snaps[-1].time
    ds = retention.apply(snaps, retention.Policy(last=2, daily=7), now)
    kept = [d.snapshot for d in ds if d.keep]
    assert snaps[-1] in kept and snaps[-2] in kept
    days = {s.time.date() for s in kept}
    assert len(days) == 7
    # weekly/monthly/yearly and within
    ds = retention.apply(snaps, retention.Policy(within=timedelta(days=2)), now)
    assert sum(d.keep for d in ds) == 9
    ds = retention.apply(snaps, retention.Policy(weekly=2), now)
    assert sum(d.keep for d in ds) == 2


def test_retention_groups_by_name_and_protects() -> None:
    t = datetime(2026, 3, 1, tzinfo=UTC)
    snaps = [_snap("a", t), _snap("a", t + timedelta(days=1)), _snap("b", t)]
    prot = {snaps[0].id}
    ds = retention.apply(snaps, retention.Policy(last=1), t, lambda s: s.id in prot)
    keep = {d.snapshot.id: d.keep for d in ds}
    assert keep == {snaps[0].id: True, snaps[1].id: True, snaps[2].id: True}
    with pytest.raises(UsageError):
        retention.apply(snaps, retention.Policy(), t)


def test_retention_tag_scope() -> None:
    t = datetime(2026, 3, 1, tzinfo=UTC)
    snaps = [_snap("a", t + timedelta(days=i), ["tier=critical"] if i % 2 else [])
             for i in range(6)]
    ds = retention.apply(snaps, retention.Policy(last=1, tags=("tier=critical",)), t)
    forgotten = [d.snapshot for d in ds if not d.keep]
    assert forgotten and all("tier=critical" in s.tags for s in forgotten)


def test_parse_duration() -> None:
    assert retention.parse_duration("1d12h") == timedelta(hours=36)
    assert retention.parse_duration("2w") == timedelta(days=14)
    for bad in ("", "5", "1x", "d1"):
        with pytest.raises(UsageError):
            retention.parse_duration(bad)


def _backup(repo: Repository, path: str, name: str) -> Snapshot:
    from vmdr.diskio.images import open_source

    with open_source(path) as src:
        rec, st = diskcopy.ingest(repo, "d", src.size, "raw", list(src.extents()), src.read)
    s = Snapshot(name, repo.clock(), repo.chunk_size, [rec], stats=st.as_dict())
    repo.save_snapshot(s)
    return s


def _age_all_chunks(path: str, seconds: float) -> None:
    old = time.time() - seconds
    for root, _, files in os.walk(os.path.join(path, "data")):
        for f in files:
            os.utime(os.path.join(root, f), (old, old))


def test_prune_deletes_only_unreferenced(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    repo = make_repo(path)
    make_image(str(tmp_path / "a.raw"), 1 << 20, seed=1)
    make_image(str(tmp_path / "b.raw"), 1 << 20, seed=2)
    sa = _backup(repo, str(tmp_path / "a.raw"), "a")
    sb = _backup(repo, str(tmp_path / "b.raw"), "b")
    only_b = sb.disks[0].chunks.ids() - sa.disks[0].chunks.ids()
    repo.delete_snapshot(sb.id)
    _age_all_chunks(path, 7 * 3600)
    res = prune(repo, dry_run=True)
    assert res.deleted == len(only_b) and all(repo.backend.exists(chunk_name(i)) for i in only_b)
    res = prune(repo)
    assert res.deleted == len(only_b)
    assert not any(repo.backend.exists(chunk_name(i)) for i in only_b)
    assert check(reopen(path), read_data=1.0).ok
    # the cache no longer claims the deleted chunks, so a new backup re-uploads them
    s = _backup(repo, str(tmp_path / "b.raw"), "b")
    assert s.stats["chunks_new"] == len(only_b)
    assert check(reopen(path), read_data=1.0).ok


def test_prune_racing_a_backup_keeps_young_chunks(tmp_path: Path) -> None:
    """A backup has uploaded chunks but not yet its manifest when prune runs."""
    path = str(tmp_path / "r")
    repo = make_repo(path)
    content = make_image(str(tmp_path / "a.raw"), 1 << 20, seed=4)
    w = DiskWriter(repo, "d", len(content))
    w.write(0, content)
    rec = w.finish()  # chunks are in the repository, the manifest is not
    other = reopen(path)
    res = prune(other)  # runs "concurrently" (e.g. locks broken by hand)
    assert res.deleted == 0 and res.kept_young > 0
    repo.save_snapshot(Snapshot("a", repo.clock(), repo.chunk_size, [rec]))
    assert check(reopen(path), read_data=1.0).ok


def test_locks(tmp_path: Path) -> None:
    be = FileBackend(str(tmp_path / "r"))
    be.create()
    s1 = locks.Lock(be, exclusive=False).acquire()
    s2 = locks.Lock(be, exclusive=False).acquire()
    with pytest.raises(RepositoryLocked) as ei:
        locks.Lock(be, exclusive=True).acquire(attempts=1)
    assert "vmdr repo unlock" in ei.value.message
    s1.release()
    s2.release()
    ex = locks.Lock(be, exclusive=True).acquire()
    with pytest.raises(RepositoryLocked):
        locks.Lock(be, exclusive=False).acquire(attempts=1)
    ex.release()
    assert list(be.list("locks")) == []


def test_stale_locks_ignored_and_unlocked(tmp_path: Path) -> None:
    be = FileBackend(str(tmp_path / "r"))
    be.create()
    clock = FakeClock(datetime.now(UTC))
    dead = locks.Lock(be, exclusive=True, clock=clock, hostname="otherhost")
    dead._write()  # written, then the process "died" without refreshing
    with pytest.raises(RepositoryLocked):
        locks.Lock(be, exclusive=False).acquire(attempts=1)
    clock.advance(minutes=31)
    later = FakeClock(clock.now)
    s = locks.Lock(be, exclusive=False, clock=later).acquire()  # stale: ignored
    s.release()
    # a lock of this host whose pid is gone is stale at once
    gone = locks.Lock(be, exclusive=True)
    gone._write()
    import json

    doc = json.loads(be.get(gone.name))
    doc["pid"] = 2**22 + 12345
    be.put(gone.name, json.dumps(doc).encode())
    removed = locks.unlock(be, clock=later)
    assert {li.name for li in removed} == {dead.name, gone.name}
    assert list(be.list("locks")) == []


def test_check_reports_damaged_snapshots(tmp_path: Path) -> None:
    path = str(tmp_path / "r")
    repo = make_repo(path)
    make_image(str(tmp_path / "a.raw"), 1 << 20, seed=9)
    sa = _backup(repo, str(tmp_path / "a.raw"), "web01")
    sb = _backup(repo, str(tmp_path / "a.raw"), "web02")
    ids = sorted(sa.disks[0].chunks.ids())
    os.unlink(os.path.join(path, chunk_name(ids[0])))
    p = os.path.join(path, chunk_name(ids[1]))
    blob = bytearray(Path(p).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    Path(p).write_bytes(bytes(blob))
    res = check(reopen(path))
    assert [p.kind for p in res.problems] == ["missing-chunk"]
    assert {d.split("@")[0] for d in res.problems[0].damages} == {"web01", "web02"}
    res = check(reopen(path), read_data=1.0)
    kinds = sorted(p.kind for p in res.problems)
    assert kinds == ["corrupt-chunk", "missing-chunk"]
    corrupt = next(p for p in res.problems if p.kind == "corrupt-chunk")
    assert f"web01@{sa.short_id}:d" in corrupt.damages
    assert f"web02@{sb.short_id}:d" in corrupt.damages
    # restricted to one snapshot
    res = check(reopen(path), read_data=1.0, snapshot_ids=[sa.id])
    assert all(all(d.startswith("web01") for d in p.damages) for p in res.problems)


def test_writer_memory_is_bounded(tmp_path: Path) -> None:
    """In-flight chunks are bounded: a 256-chunk stream never holds more than a few."""
    repo = make_repo(str(tmp_path / "r"), chunk_size=SMALL_CHUNK)
    w = DiskWriter(repo, "d", 256 * SMALL_CHUNK, workers=2)
    peak = 0
    for i in range(256):
        w.write(i * SMALL_CHUNK, os.urandom(SMALL_CHUNK))
        peak = max(peak, len(w._futures))
    w.finish()
    assert peak <= 4


def test_holes_only_disk(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    w = DiskWriter(repo, "d", 10 * SMALL_CHUNK)
    w.write(SMALL_CHUNK, bytes(SMALL_CHUNK))
    rec = w.finish()
    assert rec.chunks == ChunkList.holes(10)
    assert list(repo.backend.list("data")) == []
