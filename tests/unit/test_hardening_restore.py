"""Issue 14, item 5 and should-fix items: a failed restore with --force keeps the old
files; restored domain XML and NVRAM are written 0600 and atomically."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from tests.unit.repofixtures import SMALL_CHUNK, make_repo
from vmdr.errors import IntegrityError
from vmdr.jobs import diskcopy
from vmdr.jobs.image import restore_image
from vmdr.jobs.vmrestore import RestoreOptions, restore_vm
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository, chunk_name

SIZE = 4 * SMALL_CHUNK
XML = ("<domain><name>x</name><os><loader>/usr/share/OVMF/OVMF_CODE.fd</loader>"
       "<nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram></os><devices>"
       "<disk type='file' device='disk'><target dev='vda'/></disk>"
       "<disk type='file' device='disk'><target dev='vdb'/></disk></devices></domain>")


def _two_disk_vm(repo: Repository) -> tuple[Snapshot, dict[str, bytes]]:
    datas = {}
    disks = []
    for i, name in enumerate(("vda", "vdb")):
        data = random.Random(i).randbytes(SIZE)
        def read(off: int, n: int, d: bytes = data) -> bytes:
            return d[off:off + n]

        rec, _ = diskcopy.ingest(repo, name, SIZE, "raw", [(0, SIZE)], read)
        disks.append(rec)
        datas[name] = data
    snap = Snapshot("x", repo.clock(), repo.chunk_size, disks,
                    meta={"kind": "vm", "config": {"domain_xml": XML, "nvram": "AAAA"}})
    repo.save_snapshot(snap)
    return snap, datas


def _lose_chunk(repo_dir: Path, repo: Repository, snap: Snapshot, disk: str) -> None:
    rec = snap.disk(disk)
    assert rec is not None
    (repo_dir / chunk_name(rec.chunks[len(rec.chunks) - 1])).unlink()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_failed_vm_restore_with_force_keeps_old_disks(tmp_path: Path, fmt: str) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    snap, datas = _two_disk_vm(repo)
    out = tmp_path / "out"
    res = restore_vm(repo, snap, RestoreOptions(str(out), format=fmt), None)
    if fmt == "raw":
        assert Path(res["disks"]["vdb"]).read_bytes() == datas["vdb"]
    for p in (res["xml"], str(out / "x_VARS.fd"), *res["disks"].values()):
        assert os.stat(p).st_mode & 0o777 == 0o600, p
    before = {p: Path(p).read_bytes() for p in res["disks"].values()}
    _lose_chunk(tmp_path / "repo", repo, snap, "vdb")
    with pytest.raises(IntegrityError):
        restore_vm(repo, snap, RestoreOptions(str(out), format=fmt, force=True), None)
    assert {p: Path(p).read_bytes() for p in before} == before  # neither disk replaced
    assert not [n for n in os.listdir(out) if n.endswith(".vmdr-partial")]


def test_failed_image_restore_with_force_keeps_old_file(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    snap, datas = _two_disk_vm(repo)
    target = tmp_path / "disk.raw"
    target.write_bytes(b"old and good")
    _lose_chunk(tmp_path / "repo", repo, snap, "vda")
    with pytest.raises(IntegrityError):
        restore_image(repo, snap, str(target), "raw", "vda", overwrite=True)
    assert target.read_bytes() == b"old and good"
    restore_image(repo, snap, str(target), "raw", "vdb", overwrite=True)
    assert target.read_bytes() == datas["vdb"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".vmdr-partial")]


def test_restore_never_renames_over_devices_dirs_or_links(tmp_path: Path) -> None:
    from vmdr.errors import UsageError

    repo = make_repo(str(tmp_path / "repo"))
    snap, datas = _two_disk_vm(repo)
    for bad in ("/dev/null", str(tmp_path), str(tmp_path / "no" / "such" / "dir.raw")):
        for fmt in ("raw", "qcow2"):
            with pytest.raises(UsageError):
                restore_image(repo, snap, bad, fmt, "vda", overwrite=True)
    assert os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # a symlink is followed: the file it names is replaced, the link stays
    real = tmp_path / "real.raw"
    real.write_bytes(b"old")
    link = tmp_path / "link.raw"
    link.symlink_to(real)
    restore_image(repo, snap, str(link), "raw", "vda", overwrite=True)
    assert link.is_symlink() and real.read_bytes() == datas["vda"]
    # VM restore refuses a disk path that is a link (it would write elsewhere)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x-vda.img").symlink_to(real)
    with pytest.raises(UsageError, match="not a regular file"):
        restore_vm(repo, snap, RestoreOptions(str(out), format="raw", force=True), None)


def test_old_partials_of_killed_restores_are_swept(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    snap, datas = _two_disk_vm(repo)
    target = tmp_path / "d.raw"
    old = tmp_path / ".d.raw.0badc0de.vmdr-partial"
    fresh = tmp_path / ".d.raw.12345678.vmdr-partial"
    other = tmp_path / ".e.raw.0badc0de.vmdr-partial"
    for p in (old, fresh, other):
        p.write_bytes(b"partial")
    os.utime(old, (1, 1))
    os.utime(other, (1, 1))
    restore_image(repo, snap, str(target), "raw", "vda")
    assert not old.exists() and fresh.exists() and other.exists()
    assert target.read_bytes() == datas["vda"]
