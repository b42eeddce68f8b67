"""The one contract suite for every tape back end (the Changer and TapeDrive contracts
of src/vmdr/tape/drive.py).

Which back end: ``VMDR_TAPE_CONTRACT`` unset → the file-backed virtual library (run by
tests/unit/test_tape_contract.py); ``mtx:CHANGER,DRIVE`` or ``sg:CHANGER,DRIVE`` → the
real mtx+mt programs or SG_IO against tgt, run in a child pytest with the LD_PRELOAD
library by tests/integration/test_tape_tgt.py. The library must hold at least three data
tapes in slots 1-3, have a free slot and a free import/export slot; tests write from the
beginning of tape and leave the drive empty.

tgt's emulation bugs are expected failures or skips, each with its reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vmdr.errors import DriveNotReady, MediaRefused, NoSpace, SlotEmpty, TapeError
from vmdr.tape.devices import open_library
from vmdr.tape.library import Library

SPEC = os.environ.get("VMDR_TAPE_CONTRACT", "")
KIND = SPEC.partition(":")[0] or "virtual"
BS = 256 << 10


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Library]:
    if KIND == "virtual":
        from vmdr.tape.virtual import VirtualLibrary

        vl = VirtualLibrary.create(tmp_path / "vtl", slots=8, ie_slots=2, capacity=16 << 20,
                                   early_warning=2 << 20)
        for i in range(3):
            vl.add_tape(f"VMD00{i + 1}L8", i + 1)
        spec = f"virtual:{tmp_path / 'vtl'}"
    else:
        spec = SPEC
    lb = open_library(spec, ready_timeout=20)
    if lb.loaded_element() is not None:
        lb.unload()
    try:
        yield lb
    finally:
        try:
            if lb.loaded_element() is not None:
                lb.unload()
        finally:
            lb.close()


def _blocks(seed: int, n: int, last: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    return [rng.randbytes(BS) for _ in range(n)] + ([rng.randbytes(last)] if last else [])


def _write_file(lb: Library, blocks: list[bytes]) -> None:
    for b in blocks:
        lb.drive.write_block(b)
    lb.drive.write_filemark()


def _read_file(lb: Library) -> list[bytes]:
    out = []
    while (b := lb.drive.read_block()) is not None:
        out.append(b)
    return out


# ------------------------------------------------------------------ changer
def test_changer_status_lists_slots_drive_and_barcodes(lib: Library) -> None:
    assert lib.changer is not None
    st = lib.changer.status()
    assert len(st.drives) >= 1 and not st.drives[0].full
    assert len(st.storage_slots) >= 4 and len(st.ie_slots) >= 1
    assert [s.number for s in st.storage_slots][:3] == [1, 2, 3]
    assert all(st.slot(n) is not None and st.slot(n).full for n in (1, 2, 3))  # type: ignore[union-attr]
    barcodes = [st.slot(n).barcode for n in (1, 2, 3)]  # type: ignore[union-attr]
    assert all(barcodes) and len(set(barcodes)) == 3


def test_load_and_unload_track_the_source_slot(lib: Library) -> None:
    assert lib.changer is not None
    bc = lib.changer.status().slot(2).barcode  # type: ignore[union-attr]
    lib.changer.load(2, 0)
    st = lib.changer.status()
    assert st.drives[0].full and st.drives[0].barcode == bc and st.drives[0].source == 2
    assert not st.slot(2).full  # type: ignore[union-attr]
    lib.drive.wait_ready(20)
    lib.unload()
    st = lib.changer.status()
    assert not st.drives[0].full and st.slot(2).barcode == bc  # type: ignore[union-attr]


def test_empty_slot_is_slot_empty(lib: Library) -> None:
    assert lib.changer is not None
    empty = next(s.number for s in lib.changer.status().storage_slots if not s.full)
    with pytest.raises(SlotEmpty):
        lib.load_slot(empty)
    with pytest.raises(SlotEmpty):
        lib.changer.load(empty, 0)


def test_transfer_to_import_export_and_back(lib: Library) -> None:
    assert lib.changer is not None
    st = lib.changer.status()
    ie = next(s.number for s in st.ie_slots if not s.full)
    bc = st.slot(3).barcode  # type: ignore[union-attr]
    lib.changer.transfer(3, ie)
    st = lib.changer.status()
    assert st.slot(ie).barcode == bc and not st.slot(3).full  # type: ignore[union-attr]
    assert st.find(str(bc)) is not None and st.find(str(bc)).kind == "ie"  # type: ignore[union-attr]
    lib.changer.transfer(ie, 3)
    assert lib.changer.status().slot(3).barcode == bc  # type: ignore[union-attr]


# ------------------------------------------------------------------ drive
def test_write_rewind_read_back_byte_for_byte(lib: Library) -> None:
    lib.load_slot(1)
    d = lib.drive
    d.rewind()
    f0, f1 = _blocks(1, 3, 1000), _blocks(2, 1, 0)
    _write_file(lib, f0)
    _write_file(lib, f1)
    assert d.position() == 2
    d.rewind()
    assert d.position() == 0
    assert _read_file(lib) == f0
    assert d.position() == 1
    assert _read_file(lib) == f1


@pytest.mark.xfail(KIND in ("mtx", "sg"), strict=True,
                   reason="tgt emulation: a short block longer than half the read size comes "
                          "back with only 'residual' bytes of data (vmdr pads every block)")
def test_long_short_block_reads_back(lib: Library) -> None:
    lib.load_slot(1)
    lib.drive.rewind()
    f0 = _blocks(3, 0, BS - 1000)
    _write_file(lib, f0)
    lib.drive.rewind()
    assert _read_file(lib) == f0


def test_forward_space_and_locate_use_our_counter(lib: Library) -> None:
    lib.load_slot(1)
    d = lib.drive
    d.rewind()
    files = [_blocks(10 + i, 1, 77) for i in range(3)]
    for f in files:
        _write_file(lib, f)
    d.rewind()
    d.forward_space_files(2)
    assert d.position() == 2 and _read_file(lib) == files[2]
    d.locate_file(1)  # rewind + forward space, never backwards
    assert d.position() == 1 and _read_file(lib) == files[1]


def test_end_of_data_counts_files_and_appends(lib: Library) -> None:
    lib.load_slot(1)
    d = lib.drive
    d.rewind()
    for i in range(2):
        _write_file(lib, _blocks(20 + i, 1, 5))
    assert d.move_to_eod() == 2
    extra = _blocks(30, 0, 123)
    _write_file(lib, extra)
    d.locate_file(2)
    assert _read_file(lib) == extra
    with pytest.raises(TapeError):
        d.forward_space_files(5)


def test_writing_in_the_middle_discards_what_follows(lib: Library) -> None:
    lib.load_slot(1)
    d = lib.drive
    d.rewind()
    for i in range(3):
        _write_file(lib, _blocks(40 + i, 1, 9))
    d.locate_file(1)
    new = _blocks(50, 0, 64)
    _write_file(lib, new)
    assert d.move_to_eod() == 2
    d.locate_file(1)
    assert _read_file(lib) == new


def test_label_round_trip_through_the_library(lib: Library) -> None:
    lib.load_slot(2)
    m = lib.write_label("VMD002L8", "contract", datetime(2026, 12, 1, tzinfo=UTC))
    got = lib.read_label()
    assert (got.label, got.uuid, got.pool) == ("VMD002L8", m.uuid, "contract")


def test_not_ready_without_tape_times_out(lib: Library) -> None:
    with pytest.raises(DriveNotReady):
        lib.drive.wait_ready(0.5, poll=0.1)


def test_end_of_medium_warning_then_no_space(lib: Library) -> None:
    if KIND != "virtual":
        # measured: a 64 MiB tgtimg tape took 70 GB before the host disk filled
        pytest.skip("tgt does not enforce a tape image's size: writing to the end of the "
                    "medium fills the host's disk instead")
    lib.load_slot(3)
    d = lib.drive
    d.rewind()
    warned = False
    block = bytes(BS)
    with pytest.raises(NoSpace):
        for _ in range(10_000):
            warned = d.write_block(block) or warned
    assert warned


def test_write_protected_tape_is_refused(lib: Library) -> None:
    if KIND != "virtual":
        pytest.skip("tgt tape images have no write-protect switch to flip")
    from vmdr.tape.virtual import VirtualDrive

    assert isinstance(lib.drive, VirtualDrive)
    lib.drive.lib.set_write_protected("VMD001L8", True)
    lib.load_slot(1)
    assert lib.drive.status().write_protected
    with pytest.raises(MediaRefused):
        lib.drive.write_block(b"x" * 10)
