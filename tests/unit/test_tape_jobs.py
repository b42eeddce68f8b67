"""Tape jobs end to end on the virtual library (no device, no VM): backup, tape full
mid-set, loss of repository and catalog, rebuild from tapes alone, restore, and the bad
inputs of issue 12."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.repofixtures import FakeClock, make_image, make_repo
from vmdr.errors import (
    DriveNotReady,
    LabelUnreadable,
    MediaRefused,
    NoWritableMedia,
    SlotEmpty,
)
from vmdr.jobs.image import backup_image, restore_image
from vmdr.jobs.tape import backup_to_tape, rebuild_catalog, restore_from_tape
from vmdr.jobs.tape_media import add_pool, export_tapes, import_tapes, label_tape, vault_report
from vmdr.repository.repo import Repository
from vmdr.storage.file import FileBackend
from vmdr.tape.catalog import CatalogStore
from vmdr.tape.library import Library
from vmdr.tape.media import Pool
from vmdr.tape.virtual import VirtualLibrary

MiB = 1 << 20


def _setup(tmp: Path, capacity: int = 64 * MiB, tapes: int = 3, clock: FakeClock | None = None,
           pool: Pool | None = None) -> tuple[VirtualLibrary, Library, CatalogStore]:
    vl = VirtualLibrary.create(tmp / "vtl", slots=6, ie_slots=2, capacity=capacity,
                               early_warning=2 * MiB)
    for i in range(tapes):
        vl.add_tape(f"VMD00{i + 1}L8", i + 1)
    lib = Library(vl.drive(), vl.changer(), ready_timeout=1)
    store = CatalogStore(tmp / "catalog")
    add_pool(store, pool or Pool("daily", "continue", "30d", vault="spandau"))
    for i in range(tapes):
        label_tape(lib, store, "daily", slot=i + 1, clock=clock or FakeClock())
        lib.unload()
    return vl, lib, store


@pytest.fixture
def repo_with_images(tmp_path: Path) -> tuple[Repository, dict[str, bytes]]:
    repo = make_repo(str(tmp_path / "repo"), level=0)
    data = {}
    for i, name in enumerate(["web", "db"]):
        img = tmp_path / f"{name}.img"
        data[name] = make_image(str(img), 3 * MiB, seed=i + 1, pieces=30)
        backup_image(repo, str(img), name)
    return repo, data


def test_backup_loss_rebuild_restore(tmp_path: Path,
                                     repo_with_images: tuple[Repository, dict[str, bytes]]
                                     ) -> None:
    repo, data = repo_with_images
    clock = FakeClock()
    vl, lib, store = _setup(tmp_path, clock=clock)
    snaps = [repo.resolve("web"), repo.resolve("db")]
    res = backup_to_tape(repo, lib, store, "daily", snaps, clock=clock)
    assert res.chunks_written > 0 and res.tapes == ["VMD001L8"]
    keyfile = repo.export_key()
    # a second run appends to the same set (continue) and writes no chunk twice
    res2 = backup_to_tape(repo, lib, store, "daily", snaps, clock=clock)
    assert res2.media_set == res.media_set and res2.chunks_written == 0
    assert res2.chunks_skipped == res.chunks_written
    # the tape never carries plaintext: the image's text pieces are not on it
    tape_bytes = b"".join(p.read_bytes() for p in (vl.root / "tapes/VMD001L8").glob("file-*"))
    assert b"quick brown fox" not in tape_bytes
    # export to the vault, then disaster: repository and catalog gone
    export_tapes(lib, store, "spandau", media_set=res.media_set, clock=clock)
    repo.close()
    for p in [tmp_path / "repo", tmp_path / "catalog"]:
        os.system(f"rm -rf {p}")
    import_tapes(lib, store, ["VMD001L8"], clock=clock)  # empty catalog: unknown tape
    rb = rebuild_catalog(lib, store, keyfile)
    assert "VMD001L8" in rb.tapes and rb.snapshots == 2
    out = restore_from_tape(lib, store, FileBackend(str(tmp_path / "new")), keyfile,
                            snapshot="db")
    assert len(out.snapshots) >= 2
    new = Repository.open(FileBackend(str(tmp_path / "new")), keyfile=keyfile, use_cache=False)
    for name, content in data.items():
        target = tmp_path / f"{name}.restored"
        restore_image(new, new.resolve(name), str(target))
        assert target.read_bytes() == content


def test_full_tape_continues_on_next(tmp_path: Path,
                                     repo_with_images: tuple[Repository, dict[str, bytes]]
                                     ) -> None:
    repo, data = repo_with_images
    clock = FakeClock()
    _vl, lib, store = _setup(tmp_path, capacity=5 * MiB, tapes=4, clock=clock)
    res = backup_to_tape(repo, lib, store, "daily", [repo.resolve("web"), repo.resolve("db")],
                         clock=clock)
    assert len(res.tapes) >= 2 and res.tapes_full
    keyfile = repo.export_key()
    os.system(f"rm -rf {tmp_path / 'catalog'}")
    rebuild_catalog(lib, store, keyfile)
    restore_from_tape(lib, store, FileBackend(str(tmp_path / "new")), keyfile, snapshot="web")
    new = Repository.open(FileBackend(str(tmp_path / "new")), keyfile=keyfile, use_cache=False)
    restore_image(new, new.resolve("web"), str(tmp_path / "w"))
    assert (tmp_path / "w").read_bytes() == data["web"]


def test_retention_and_bad_input(tmp_path: Path,
                                 repo_with_images: tuple[Repository, dict[str, bytes]]) -> None:
    repo, _ = repo_with_images
    clock = FakeClock()
    vl, lib, store = _setup(tmp_path, tapes=1, clock=clock,
                            pool=Pool("daily", "always", "7d"))
    snaps = [repo.resolve("web")]
    backup_to_tape(repo, lib, store, "daily", snaps, clock=clock)
    # a new set is due (always) but the only tape is retained: refused, not overwritten
    with pytest.raises(NoWritableMedia):
        backup_to_tape(repo, lib, store, "daily", snaps, clock=clock)
    with pytest.raises(MediaRefused):
        label_tape(lib, store, "daily", slot=1, force=True, clock=clock)
    clock.advance(days=8)
    backup_to_tape(repo, lib, store, "daily", snaps, clock=clock)  # now it may
    # write-protected
    lib.unload()
    vl.set_write_protected("VMD001L8", True)
    clock.advance(days=8)
    with pytest.raises(MediaRefused, match="write-protected"):
        backup_to_tape(repo, lib, store, "daily", snaps, clock=clock)
    # empty slot, unreadable label, another pool, drive never ready
    with pytest.raises(SlotEmpty):
        lib.load_slot(5)
    lib.unload()
    vl.add_tape("BLANK1L8", 3)
    lib.load_slot(3)
    with pytest.raises(LabelUnreadable):
        lib.read_label()
    lib.unload()
    add_pool(store, Pool("other"))
    with pytest.raises(NoWritableMedia):
        backup_to_tape(repo, lib, store, "other", snaps, clock=clock)
    lib.unload()
    with pytest.raises(DriveNotReady):
        lib.drive.wait_ready(0.05, poll=0.01)


def test_vault_report(tmp_path: Path,
                      repo_with_images: tuple[Repository, dict[str, bytes]]) -> None:
    repo, _ = repo_with_images
    clock = FakeClock()
    _vl, lib, store = _setup(tmp_path, capacity=4 * MiB, clock=clock)
    res = backup_to_tape(repo, lib, store, "daily", [repo.resolve("web")], clock=clock)
    cat = store.load()
    lines = {v.label: v for v in vault_report(cat, clock())}
    full = res.tapes_full[0]
    assert lines[full].action == "send to vault spandau"
    export_tapes(lib, store, "spandau", labels=[full], clock=clock)
    clock.advance(days=31)
    lines = {v.label: v for v in vault_report(store.load(), clock())}
    assert lines[full].action == "recall from vault spandau"


def test_seed_rotation_and_cleaning(tmp_path: Path,
                                    repo_with_images: tuple[Repository, dict[str, bytes]]
                                    ) -> None:
    repo, _ = repo_with_images
    clock = FakeClock()
    vl = VirtualLibrary.create(tmp_path / "vtl", slots=4, ie_slots=1, capacity=64 * MiB)
    for i in range(2):
        vl.add_tape(f"ROT00{i + 1}", i + 1)
    vl.add_tape("CLN001L1", 4)
    lib = Library(vl.drive(), vl.changer(), ready_timeout=1)
    store = CatalogStore(tmp_path / "catalog")
    add_pool(store, Pool("small", "rotation", "overwrite"), maxslot=2)
    for slot in (1, 2):
        label_tape(lib, store, "small", slot=slot, clock=clock)
        lib.unload()
    used = []
    for day in range(3):
        if day == 1:
            vl.set_needs_cleaning(True)  # the drive asks: the CLN tape goes in first
        res = backup_to_tape(repo, lib, store, "small", [repo.resolve("web")], clock=clock)
        used += res.tapes
        clock.advance(days=1)
    assert used == ["ROT001", "ROT002", "ROT001"]
    rot = store.rotation("small")
    assert rot.slot == 1 and [s for _, s, _ in rot.history] == [1, 2, 1]
    assert (store.root / "rotation/small/history").read_text().count("\n") == 3
    assert vl.tape_meta("CLN001L1")["cleanings"] == 1
    assert not vl.state()["needs_cleaning"]


def test_quick_rebuild_reads_each_tapes_catalog(tmp_path: Path,
                                                repo_with_images: tuple[Repository,
                                                                        dict[str, bytes]]
                                                ) -> None:
    repo, _ = repo_with_images
    clock = FakeClock()
    _vl, lib, store = _setup(tmp_path, capacity=5 * MiB, tapes=4, clock=clock)
    backup_to_tape(repo, lib, store, "daily", [repo.resolve("web"), repo.resolve("db")],
                   clock=clock)
    before = store.load()
    keyfile = repo.export_key()
    os.system(f"rm -rf {tmp_path / 'catalog'}")
    quick = rebuild_catalog(lib, store, keyfile, full=False)
    after = store.load()
    assert quick.bytes_read == 0 and quick.snapshots == 2
    assert {k: (v.name, v.tape, v.file) for k, v in after.snapshots.items()} == \
        {k: (v.name, v.tape, v.file) for k, v in before.snapshots.items()}
    assert after.chunk_locations() == before.chunk_locations()
    # and without the key, nothing on the tapes is trusted
    os.system(f"rm -rf {tmp_path / 'catalog'}")
    from vmdr.errors import IntegrityError

    with pytest.raises(IntegrityError, match="key"):
        rebuild_catalog(lib, store, None)


def test_tape_from_another_pool_is_refused(tmp_path: Path,
                                           repo_with_images: tuple[Repository,
                                                                   dict[str, bytes]]
                                           ) -> None:
    repo, _ = repo_with_images
    clock = FakeClock()
    _vl, lib, store = _setup(tmp_path, tapes=1, clock=clock)
    add_pool(store, Pool("weekly"))
    with store.locked() as cat:  # the catalog thinks it is weekly's; its label says daily
        next(iter(cat.media.values())).pool = "weekly"
    with pytest.raises(MediaRefused, match="from pool 'daily'"):
        backup_to_tape(repo, lib, store, "weekly", [repo.resolve("web")], clock=clock)
