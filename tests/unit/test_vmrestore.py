"""``restore_vm`` records each successful restore in the repository (kind ``restore``),
best effort: a repository that refuses the record does not fail the restore."""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path

import pytest

from tests.unit.repofixtures import SMALL_CHUNK, FakeClock, make_repo
from vmdr.errors import StorageError, UsageError
from vmdr.jobs import diskcopy
from vmdr.jobs import plan as planjob
from vmdr.jobs.vmrestore import RestoreOptions, restore_vm
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository
from vmdr.storage.faulty import Fault, FaultyBackend
from vmdr.storage.file import FileBackend

SIZE = 8 * SMALL_CHUNK  # 512 KiB, with holes
# the restore rewrites the disk's source, so the XML needs the disk (``<devices/>`` alone
# fails in rewrite_domain_xml: "no disk vda in the domain XML")
DOMAIN_XML = ("<domain><name>x</name><devices><disk type='file' device='disk'>"
              "<target dev='vda'/></disk></devices></domain>")


def vm_snapshot(repo: Repository) -> tuple[Snapshot, bytearray]:
    """A VM snapshot of one raw disk, built by hand (no hypervisor)."""
    data = bytearray(SIZE)  # data in two chunks, the rest holes
    data[2 * SMALL_CHUNK:3 * SMALL_CHUNK] = random.Random(1).randbytes(SMALL_CHUNK)
    data[5 * SMALL_CHUNK + 10:5 * SMALL_CHUNK + 40] = b"the quick brown fox jumps over"
    disk, _ = diskcopy.ingest(repo, "vda", SIZE, "raw", [(0, SIZE)],
                              lambda off, n: bytes(data[off:off + n]))
    snap = Snapshot("x", repo.clock(), repo.chunk_size, [disk], host="hv-test",
                    meta={"kind": "vm", "config": {"domain_xml": DOMAIN_XML}})
    repo.save_snapshot(snap)
    return snap, data


def test_a_restore_is_recorded(tmp_path: Path) -> None:
    clock = FakeClock()
    repo = make_repo(str(tmp_path / "repo"), clock=clock)
    snap, data = vm_snapshot(repo)
    clock.advance(hours=1)
    res = restore_vm(repo, snap, RestoreOptions(str(tmp_path / "out"), format="raw"), None)
    assert (tmp_path / "out" / "x-vda.img").read_bytes() == data
    recs = repo.attachments(snap.id, "restore")
    assert len(recs) == 1 and res["attachment"]
    assert recs[0] == {
        "kind": "restore", "snapshot": snap.id, "time": "2026-01-01T13:00:00.000000Z",
        "bytes_written": res["bytes_written"], "size": SIZE, "restore_s": res["restore_s"],
        "heartbeat_s": None, "target": socket.gethostname(), "format": "raw",
        "repository": repo.id}
    assert res["bytes_written"] == 2 * SMALL_CHUNK  # sparse: holes are not written
    # and the plan reads it back as a measured restore of this repository
    (copy,) = planjob.read_repository(repo, "r")
    (rec,) = copy.restores
    assert rec.same_repo and rec.size == SIZE and rec.heartbeat_s is None
    assert rec.throughput == (SIZE / res["restore_s"] if res["restore_s"] else None)
    repo.close()


def test_a_refused_record_does_not_fail_the_restore(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = FaultyBackend(FileBackend(str(tmp_path / "repo")))
    repo = make_repo(backend)
    snap, data = vm_snapshot(repo)
    backend.add(Fault("put", "attachments/*", StorageError("read-only file system")))
    with caplog.at_level(logging.WARNING, logger="vmdr.jobs.vmrestore"):
        res = restore_vm(repo, snap, RestoreOptions(str(tmp_path / "out"), format="raw"), None)
    assert (tmp_path / "out" / "x-vda.img").read_bytes() == data
    assert res["attachment"] is None and not repo.attachments(snap.id)
    assert f"restored x@{snap.short_id}, but could not record the restore in the " \
        "repository: read-only file system" in caplog.text
    repo.close()


def test_a_failed_restore_records_nothing(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    snap, _ = vm_snapshot(repo)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x-vda.img").write_bytes(b"in the way")
    with pytest.raises(UsageError, match="exists; use --force"):
        restore_vm(repo, snap, RestoreOptions(str(tmp_path / "out"), format="raw"), None)
    assert repo.attachments(snap.id) == []
    repo.close()
