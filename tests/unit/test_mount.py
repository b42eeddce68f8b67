"""File-level restore helpers without mounting anything: partition tables, choosing a
partition, mount options, and paths confined to the guest filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdr.errors import UsageError
from vmdr.fileaccess import Partition, UnsupportedFilesystem, choose, copy_out, list_path, resolve
from vmdr.fileaccess.partitions import parse_sfdisk
from vmdr.jobs.mount import pick_disk, state_path

MBR: dict[str, object] = {"partitiontable": {"label": "dos", "sectorsize": 512, "partitions": [
    {"node": "/x/disk1", "start": 2048, "size": 131072, "type": "83"},
    {"node": "/x/disk2", "start": 133120, "size": 1000, "type": "5"},
    {"node": "/x/disk5", "start": 135168, "size": 900, "type": "83"}]}}
GPT: dict[str, object] = {"partitiontable": {"label": "gpt", "sectorsize": 4096, "partitions": [
    {"node": "img1", "start": 256, "size": 1024,
     "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"}]}}


def test_parse_sfdisk_mbr_and_gpt() -> None:
    sector, rows = parse_sfdisk(MBR)
    assert sector == 512 and [r[0] for r in rows] == [1, 2, 5]
    assert rows[0][1:3] == (2048, 131072)
    sector, rows = parse_sfdisk(GPT)
    assert sector == 4096 and rows == [(1, 256, 1024, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")]
    with pytest.raises(ValueError):
        parse_sfdisk({})


def _parts() -> list[Partition]:
    return [Partition(1, 1 << 20, 64 << 20, "83", "ext4", "data"),
            Partition(2, 65 << 20, 100 << 20, "da", None),
            Partition(3, 200 << 20, 10 << 20, "82", "swap")]


def test_choose() -> None:
    assert choose(_parts(), None, "vdb").number == 1  # the only readable one
    assert choose(_parts(), 1, "vdb").fstype == "ext4"
    with pytest.raises(UnsupportedFilesystem, match="partition 2 has no filesystem"):
        choose(_parts(), 2, "vdb")
    with pytest.raises(UnsupportedFilesystem, match="partition 3 holds swap"):
        choose(_parts(), 3, "vdb")
    with pytest.raises(UsageError, match="no partition 9"):
        choose(_parts(), 9, "vdb")
    two = [*_parts(), Partition(4, 300 << 20, 400 << 20, "83", "xfs")]
    with pytest.raises(UsageError, match="several filesystems"):
        choose(two, None, "vdb")
    with pytest.raises(UnsupportedFilesystem, match="no filesystem vmdr can read"):
        choose(_parts()[1:2], None, "vdb")


def test_mount_options_never_replay_journals() -> None:
    opts = {fs: Partition(1, 0, 1, "", fs).mount_options() for fs in ("ext4", "xfs", "ext3")}
    assert opts["ext4"].startswith("ro,noload") and "norecovery" in opts["xfs"]
    assert all("nodev,nosuid,noexec" in o for o in opts.values())
    assert UnsupportedFilesystem.exit_code == 2


@pytest.fixture
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("guest passwd\n")
    (root / "data").mkdir()
    (root / "data" / "f.txt").write_text("f\n")
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("../etc", root / "data" / "rel")
    os.symlink("../../../../../../../../etc/shadow", root / "up")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.mkfifo(root / "data" / "fifo")
    return root


def test_resolve_stays_in_the_guest(guest: Path) -> None:
    assert resolve(str(guest), "/abs") == str(guest / "etc" / "passwd")
    assert resolve(str(guest), "data/rel/passwd") == str(guest / "etc" / "passwd")
    assert resolve(str(guest), "/../../data/f.txt") == str(guest / "data" / "f.txt")
    with pytest.raises(UsageError, match="no such file"):
        resolve(str(guest), "/up")  # the guest's /etc/shadow, which it does not have
    with pytest.raises(UsageError, match="symbolic links"):
        resolve(str(guest), "/loop1")


def test_list_and_copy(guest: Path, tmp_path: Path) -> None:
    names = {e["name"]: e for e in list_path(str(guest), "/data")}
    assert names["f.txt"]["type"] == "file" and names["fifo"]["type"] == "other"
    assert names["rel"] == {**names["rel"], "type": "link", "target": "../etc"}
    out = tmp_path / "out"
    out.mkdir()
    dest, files, size = copy_out(str(guest), "/data", str(out))
    assert dest == str(out / "data") and files == 1 and size == 2
    assert not (out / "data" / "fifo").exists()  # never open a FIFO
    assert os.readlink(out / "data" / "rel") == "../etc"
    with pytest.raises(UsageError, match="exists"):
        copy_out(str(guest), "/data", str(out))
    dest, files, size = copy_out(str(guest), "/abs", str(tmp_path / "p"))
    assert (tmp_path / "p").read_text() == "guest passwd\n"


def test_pick_disk_and_state_path() -> None:
    from datetime import UTC, datetime

    from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot

    snap = Snapshot(name="w", time=datetime.now(UTC), chunk_size=1 << 22, id="cd" * 32)
    with pytest.raises(UsageError, match="no disks"):
        pick_disk(snap, None)
    snap.disks = [DiskRecord(n, 1 << 22, ChunkList.holes(1)) for n in ("vda", "vdb")]
    assert pick_disk(snap, None).name == "vda" and pick_disk(snap, "vdb").name == "vdb"
    with pytest.raises(UsageError, match="it has vda, vdb"):
        pick_disk(snap, "vdc")
    assert state_path("/mnt/x/") == state_path("/mnt/x")


@pytest.mark.parametrize("argv", [["files", "ls"], ["files", "get"], ["files", "partitions"],
                                  ["mount"], ["umount"], ["instant-restore"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from vmdr.cli.main import build_parser

    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args([*argv, "--help"])
    assert ei.value.code == 0 and "usage: vmdr" in capsys.readouterr().out
