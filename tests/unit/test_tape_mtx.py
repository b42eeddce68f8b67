"""``mtx status`` parsing on canned outputs, SCSI sense decoding and READ ELEMENT STATUS
parsing — no device needed.

tests/unit/mtx_status/ holds one output captured from the real ``mtx`` against tgt on this
machine and outputs in the shapes of published listings from several real libraries
(QuadStor VTL, IBM 3573 and 3584, a Bacula/Amanda-documented changer, old mtx) plus a few
synthetic ones; its README.md says where each shape comes from."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmdr.errors import MediaRefused, NoSpace, TapeError
from vmdr.tape.mtx import parse_mtx_status
from vmdr.tape.sgio import _error, decode_sense, parse_element_status

CANNED = Path(__file__).parent / "mtx_status"


def _load(name: str) -> str:
    return (CANNED / name).read_text()


def test_autoloader_with_barcodes() -> None:
    st = parse_mtx_status(_load("autoloader_8slot_barcodes.txt"))
    assert [(d.number, d.full, d.barcode, d.source) for d in st.drives] == \
        [(0, True, "000003L5", 3)]
    assert len(st.slots) == 8 and not st.ie_slots
    assert st.slot(1) is not None and st.slot(1).barcode == "000001L5"  # type: ignore[union-attr]
    assert st.slot(3) is not None and not st.slot(3).full  # type: ignore[union-attr]
    assert [s.number for s in st.slots if s.cleaning] == [8]
    assert st.find("000004L5") is not None and st.find("000004L5").number == 4  # type: ignore[union-attr]


def test_library_with_ie_and_blank_tags() -> None:
    st = parse_mtx_status(_load("library_24slot_ie.txt"))
    assert [d.full for d in st.drives] == [False, True]
    assert st.drives[1].source == 7 and st.drives[1].barcode == "ABC007L6"
    assert [(s.number, s.barcode) for s in st.ie_slots] == [(24, "ABC024L6")]
    assert all(s.barcode is None for s in st.slots if not s.full)
    assert len(st.storage_slots) == 23


def test_no_barcode_reader() -> None:
    st = parse_mtx_status(_load("no_barcode_reader.txt"))
    assert st.drives[0].full and st.drives[0].barcode is None and st.drives[0].source == 2
    assert [s.number for s in st.slots if s.full] == [1, 3, 4, 6]
    assert all(s.barcode is None for s in st.slots)


def test_drives_from_one_alternate_tags_unknown_source() -> None:
    st = parse_mtx_status(_load("drives_from_1_alternate_tags.txt"))
    assert [(d.number, d.barcode, d.source) for d in st.drives] == \
        [(1, None, None), (2, "073220L6", 40), (3, "073221L6", None)]
    assert st.slot(1).barcode == "073200L6"  # type: ignore[union-attr]
    assert [(s.number, s.full) for s in st.ie_slots] == [(41, False), (42, True)]


def test_tgt_capture() -> None:
    st = parse_mtx_status(_load("tgt_library.txt"))
    assert st.drives and st.slots and st.ie_slots
    assert all(s.barcode for s in st.slots if s.full)


def test_garbage_is_an_error() -> None:
    with pytest.raises(TapeError):
        parse_mtx_status("mtx: cannot open SCSI device\n")
    with pytest.raises(TapeError):
        parse_mtx_status("Data Transfer Element X:Fullish\n      Storage Element 1:Full\n")


def _fixed(key: int, asc: int = 0, ascq: int = 0, fm: bool = False, eom: bool = False,
           ili: bool = False, info: int | None = None) -> bytes:
    sb = bytearray(18)
    sb[0] = 0x70 | (0x80 if info is not None else 0)
    sb[2] = key | (0x80 if fm else 0) | (0x40 if eom else 0) | (0x20 if ili else 0)
    if info is not None:
        sb[3:7] = struct.pack(">i", info)
    sb[7] = 10
    sb[12], sb[13] = asc, ascq
    return bytes(sb)


def test_sense_decoding() -> None:
    s = decode_sense(_fixed(0, 0, 1, fm=True))
    assert s is not None and s.filemark and s.key == 0
    s = decode_sense(_fixed(0, 0, 2, eom=True))
    assert s is not None and s.eom
    s = decode_sense(_fixed(0, ili=True, info=1000))
    assert s is not None and s.ili and s.info == 1000
    s = decode_sense(_fixed(8, 0, 5))
    assert s is not None and s.key == 8 and "BLANK CHECK" in s.text
    assert isinstance(_error("d", "WRITE", decode_sense(_fixed(7, 0x27, 0))),  # type: ignore[arg-type]
                      MediaRefused)
    assert isinstance(_error("d", "WRITE", decode_sense(_fixed(0xD, 0, 2))),  # type: ignore[arg-type]
                      NoSpace)
    # descriptor format: stream commands descriptor with FILEMARK, information = 7
    desc = (bytes([0x72, 0x00, 0x00, 0x01, 0, 0, 0, 24, 0x00, 0x0A, 0x80, 0])
            + struct.pack(">q", 7) + bytes([0x04, 0x02, 0, 0x80]))
    s = decode_sense(desc)
    assert s is not None and s.info == 7 and s.filemark
    assert decode_sense(b"") is None


def _element_reply(etype: int, elems: list[tuple[int, bool, str, int | None]]) -> bytes:
    descs = b""
    for addr, full, tag, src in elems:
        d = bytearray(52)
        d[0:2] = struct.pack(">H", addr)
        d[2] = 1 if full else 0
        if src is not None:
            d[9] = 0x80
            d[10:12] = struct.pack(">H", src)
        d[12:48] = tag.encode().ljust(36)
        descs += bytes(d)
    page = bytes([etype, 0x80]) + struct.pack(">H", 52) + b"\0" + len(descs).to_bytes(3, "big")
    body = page + descs
    return struct.pack(">HH", elems[0][0], len(elems)) + b"\0" + len(body).to_bytes(3, "big") \
        + body


def test_element_status_parsing_and_short_reply() -> None:
    reply = _element_reply(2, [(1000, True, "T1", None), (1001, False, "", None),
                               (1002, True, "T3", None)])
    assert parse_element_status(reply, 2) == [(1000, True, "T1", None),
                                              (1001, False, None, None),
                                              (1002, True, "T3", None)]
    # tgt's reply is 8 bytes short: the descriptors present are still read
    assert parse_element_status(reply[:-8], 2)[:2] == [(1000, True, "T1", None),
                                                       (1001, False, None, None)]
    drv = _element_reply(4, [(500, True, "T9", 1003)])
    assert parse_element_status(drv, 4) == [(500, True, "T9", 1003)]


# ---------------------------------------------------------------- shapes of real libraries
# (tests/unit/mtx_status/README.md says where each shape comes from)
def test_quadstor_vtl_large_slot_count() -> None:
    st = parse_mtx_status(_load("quadstor_vtl_4drives_121slots.txt"))
    assert [d.number for d in st.drives] == [0, 1, 2, 3] and not any(d.full for d in st.drives)
    assert len(st.storage_slots) == 120 and [s.number for s in st.ie_slots] == [121]
    assert [s.number for s in st.slots if s.full] == [1, 2, 3, 4, 5, 6, 121]
    assert st.find("QSV121S") is not None and st.find("QSV121S").kind == "ie"  # type: ignore[union-attr]
    assert st.slot(120) is not None and not st.slot(120).full  # type: ignore[union-attr]


def test_ibm_mostly_import_export_padded_tags_and_untagged_full_slot() -> None:
    st = parse_mtx_status(_load("ibm_two_drives_36_ie_slots.txt"))
    assert (st.drives[0].barcode, st.drives[0].source) == ("LT2000L3", 2)
    assert [s.number for s in st.storage_slots] == [1, 2] and len(st.ie_slots) == 36
    assert st.slot(33) is not None and st.slot(33).full and st.slot(33).barcode is None  # type: ignore[union-attr]
    assert [s.barcode for s in st.ie_slots if s.barcode] == [f"LT20{n:02d}L3"
                                                           for n in range(5, 12)]


def test_six_digit_tags_and_trailing_import_export() -> None:
    st = parse_mtx_status(_load("six_digit_tags_45slots.txt"))
    assert (st.drives[0].barcode, st.drives[0].source) == ("100000", 1)
    assert [(s.number, s.barcode) for s in st.slots if s.full] == \
        [(2, "100002"), (4, "100004"), (5, "100001"), (6, "100003"), (45, "100045")]
    assert [s.number for s in st.ie_slots] == [41, 42, 43, 44, 45]


def test_old_mtx_prints_a_lone_drive_without_number() -> None:
    st = parse_mtx_status(_load("old_mtx_unnumbered_drive.txt"))
    assert [(d.number, d.full, d.barcode, d.source) for d in st.drives] == \
        [(0, True, None, 3)]
    assert [s.number for s in st.slots if s.full] == [1, 2, 4, 9]


def test_ibm_3584_indented_lines_and_short_tags() -> None:
    st = parse_mtx_status(_load("ibm_3584_logical_library.txt"))
    assert [(d.number, d.full) for d in st.drives] == [(0, True), (1, False), (2, False)]
    assert (st.drives[0].barcode, st.drives[0].source) == ("BRX003", 12)
    assert st.slot(7).barcode == "UA011"  # type: ignore[union-attr]
    assert len(st.storage_slots) == 20 and [s.number for s in st.ie_slots] == [21, 22, 23, 24]


def test_drive_with_tag_but_no_source_clause() -> None:
    st = parse_mtx_status(_load("drive_tag_without_source.txt"))
    assert [(d.number, d.full, d.barcode, d.source) for d in st.drives] == \
        [(0, True, "MOCK02", None), (1, True, None, None)]


def test_every_canned_output_parses_and_matches_its_header() -> None:
    for f in sorted(CANNED.glob("*.txt")):
        st = parse_mtx_status(f.read_text())
        assert st.drives and st.slots, f.name
        assert all(s.barcode is None for s in st.slots if not s.full), f.name
        assert len({s.number for s in st.slots}) == len(st.slots), f.name


def test_cut_off_output_is_an_error() -> None:
    text = _load("quadstor_vtl_4drives_121slots.txt")
    with pytest.raises(TapeError, match="cut-off"):
        parse_mtx_status("\n".join(text.splitlines()[:60]))
    assert parse_mtx_status("# a comment line\n" + text).slot(121) is not None
