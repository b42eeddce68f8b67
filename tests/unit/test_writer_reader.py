"""Streaming writer and reader: byte-exact round trips, incrementals, concurrency."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from vmdr.diskio.images import open_source
from vmdr.errors import NoSpace
from vmdr.jobs import diskcopy
from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import Snapshot
from vmdr.repository.reader import DiskReader
from vmdr.repository.writer import DiskWriter, chunk_ranges
from vmdr.storage.faulty import Fault, FaultyBackend
from vmdr.storage.file import FileBackend

from .repofixtures import SMALL_CHUNK, FakeClock, make_image, make_repo, reopen


def _ingest_file(repo, path: str, name: str = "img", base=None):  # type: ignore[no-untyped-def]
    with open_source(path) as src:
        rec, stats = diskcopy.ingest(repo, name, src.size, src.format, list(src.extents()),
                                     src.read, base=base)
    return rec, stats


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_round_trip_byte_exact_and_sparse(tmp_path: Path, encryption: str, direct: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vmdr.diskio import images

    monkeypatch.setattr(images, "USE_DIRECT", direct and images.USE_DIRECT)
    repo = make_repo(str(tmp_path / "r"), encryption=encryption)
    size = 3 * 1024 * 1024 + 12345  # not a multiple of the chunk size
    content = make_image(str(tmp_path / "in.raw"), size)
    rec, stats = _ingest_file(repo, str(tmp_path / "in.raw"))
    assert stats.chunks_zero + stats.chunks_new + stats.chunks_dedup > 0
    holes = sum(1 for oid in rec.chunks if oid == HOLE)
    assert holes > 0, "an image with holes must produce hole entries"
    out = str(tmp_path / "out.raw")
    diskcopy.restore(repo, rec, out)
    assert Path(out).read_bytes() == content
    assert os.stat(out).st_blocks * 512 < size  # written sparse


def test_stored_zero_chunk_restores_as_hole(tmp_path: Path) -> None:
    """A chunk of zeros stored as data (not a hole entry) still comes back sparse, and
    the restored bytes match."""
    repo = make_repo(str(tmp_path / "r"))
    data = bytes(SMALL_CHUNK) + os.urandom(SMALL_CHUNK) + bytes(1000)
    rec = DiskWriter(repo, "d", len(data)).finish()
    for i, piece in enumerate((bytes(SMALL_CHUNK), data[SMALL_CHUNK:2 * SMALL_CHUNK],
                               bytes(1000))):
        oid = repo.codec.object_id(piece)
        repo.put_chunk(oid, piece)
        rec.chunks[i] = oid
    out = str(tmp_path / "out.raw")
    assert diskcopy.restore(repo, rec, out) == SMALL_CHUNK
    assert Path(out).read_bytes() == data


def test_restore_qcow2(tmp_path: Path) -> None:
    import subprocess

    repo = make_repo(str(tmp_path / "r"))
    content = make_image(str(tmp_path / "in.raw"), 2 << 20, seed=7)
    rec, _ = _ingest_file(repo, str(tmp_path / "in.raw"))
    out = str(tmp_path / "out.qcow2")
    diskcopy.restore(repo, rec, out, fmt="qcow2")
    raw = str(tmp_path / "back.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", out, raw], check=True)
    assert Path(raw).read_bytes() == content


def test_qcow2_source_reads_only_allocated(tmp_path: Path) -> None:
    import subprocess

    repo = make_repo(str(tmp_path / "r"))
    content = make_image(str(tmp_path / "in.raw"), 4 << 20, seed=3, pieces=3)
    q = str(tmp_path / "in.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(tmp_path / "in.raw"), q],
                   check=True)
    rec, stats = _ingest_file(repo, q)
    assert rec.format == "qcow2"
    assert stats.bytes_read < len(content)
    out = str(tmp_path / "out.raw")
    diskcopy.restore(repo, rec, out)
    assert Path(out).read_bytes() == content


def test_second_ingest_dedups(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    make_image(str(tmp_path / "in.raw"), 2 << 20)
    _, s1 = _ingest_file(repo, str(tmp_path / "in.raw"))
    _, s2 = _ingest_file(repo, str(tmp_path / "in.raw"))
    assert s1.chunks_new > 0
    assert s2.chunks_new == 0 and s2.bytes_stored == 0


def test_incremental_reuses_base(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    size = 2 << 20
    content = bytearray(make_image(str(tmp_path / "in.raw"), size))
    full, _ = _ingest_file(repo, str(tmp_path / "in.raw"))
    # the "guest" changes 100 bytes in chunk 5; an incremental reads just that chunk
    off = 5 * SMALL_CHUNK + 1000
    content[off : off + 100] = b"\xab" * 100
    w = DiskWriter(repo, "img", size, base=full.chunks)
    start = 5 * SMALL_CHUNK
    w.write(start, bytes(content[start : start + SMALL_CHUNK]))
    inc = w.finish()
    assert w.stats.bytes_read == SMALL_CHUNK
    assert [i for i in range(len(inc.chunks)) if inc.chunks[i] != full.chunks[i]] == [5]
    out = str(tmp_path / "out.raw")
    diskcopy.restore(repo, inc, out)
    assert Path(out).read_bytes() == bytes(content)


def test_unaligned_pieces_and_gaps(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    size = 10 * SMALL_CHUNK + 7
    expect = bytearray(size)
    w = DiskWriter(repo, "d", size)
    rng = random.Random(5)
    pos = 3
    while pos < size:
        n = min(size - pos, rng.randrange(1, 3 * SMALL_CHUNK))
        if rng.random() < 0.6:
            piece = rng.randbytes(n)
            w.write(pos, piece)
            expect[pos : pos + n] = piece
        pos += n + rng.randrange(0, 5000)
    rec = w.finish()
    assert DiskReader(repo, rec).read(0, size) == bytes(expect)
    with pytest.raises(ValueError):
        DiskWriter(repo, "d", 100).write(50, b"x" * 60)


def test_descending_writes_rejected(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "r"))
    w = DiskWriter(repo, "d", 4 * SMALL_CHUNK)
    w.write(3 * SMALL_CHUNK, b"a")
    with pytest.raises(ValueError):
        w.write(0, b"b")
    w.abort()


def test_chunk_ranges() -> None:
    assert list(chunk_ranges([(10, 5), (20, 100)], 64, 1000)) == [(0, 128)]
    assert list(chunk_ranges([(0, 64), (640, 1)], 64, 700)) == [(0, 64), (640, 60)]
    assert list(chunk_ranges([(300, 0)], 64, 1000)) == []


def test_two_concurrent_writers(tmp_path: Path) -> None:
    """Two hosts back up into one repository at the same time: both succeed."""
    path = str(tmp_path / "r")
    make_repo(path).close()
    images = []
    for i in range(2):
        p = str(tmp_path / f"img{i}.raw")
        images.append((p, make_image(p, 2 << 20, seed=10 + i)))
    errors: list[BaseException] = []
    ids: list[str] = []

    def run(i: int) -> None:
        try:
            repo = reopen(path)
            with repo.lock(exclusive=False, command="test"):
                rec, _ = _ingest_file(repo, images[i][0], f"vm{i}")
                s = Snapshot(f"vm{i}", FakeClock()(), repo.chunk_size, [rec])
                ids.append(repo.save_snapshot(s))
            repo.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    repo = reopen(path)
    assert len(repo.list_snapshots()) == 2
    for i in range(2):
        s = repo.resolve(f"vm{i}")
        out = str(tmp_path / f"out{i}.raw")
        diskcopy.restore(repo, s.disks[0], out)
        assert Path(out).read_bytes() == images[i][1]


def test_no_space_mid_backup_leaves_repo_clean(tmp_path: Path) -> None:
    from vmdr.repository.check import check

    path = str(tmp_path / "r")
    make_repo(path).close()
    fb = FaultyBackend(FileBackend(path))
    fb.add(Fault("put", "data/*", NoSpace("no space left on device"), after=3))
    repo = reopen(fb)
    make_image(str(tmp_path / "in.raw"), 3 << 20, seed=2, pieces=40)
    with pytest.raises(NoSpace):
        _ingest_file(repo, str(tmp_path / "in.raw"))
    assert repo.snapshot_ids() == []
    assert check(reopen(path), read_data=1.0).ok


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page_cache"])
def test_raw_source_reads_match_pread(tmp_path: Path, direct: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligned, unaligned, end-of-file and past-the-end reads return exactly what
    ``pread`` returns, with or without ``O_DIRECT``."""
    from vmdr.diskio import images

    monkeypatch.setattr(images, "USE_DIRECT", direct and images.USE_DIRECT)
    size = 5 * 4096 * 16 + 777
    data = random.Random(3).randbytes(size)
    path = tmp_path / "src.raw"
    path.write_bytes(data)
    with images.RawSource(str(path)) as src:
        for off, n in ((0, 65536), (4096, 8192), (100, 5000), (size - 777, 4096),
                       (size - 5000, 5000), (size, 4096), (0, size), (65536, 1 << 20)):
            assert src.read(off, n) == data[off : off + n], (off, n)
