"""Checkpoint naming, incremental decisions, deletion by prefix, redefinition."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import CheckpointMissing
from vmdr.hypervisor import checkpoints as ck
from vmdr.hypervisor.domain import DiskInfo

P = "vmdr-1a2b3c4d"
QCOW = DiskInfo("vda", "/a.qcow2", "file", "qcow2", virtual_size=1 << 30)
RAW = DiskInfo("vdb", "/b.raw", "file", "raw", virtual_size=1 << 20)


@pytest.fixture
def fake() -> Iterator[Any]:
    yield fl.install()
    fl.uninstall()


def test_names_are_per_prefix() -> None:
    name = ck.checkpoint_name(P, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert name == f"{P}-20260102T030405.000Z"
    assert ck.is_ours(name, P) and ck.is_ours(name + "-2", P)
    assert not ck.is_ours(name, "vmdr-1a2b3c4")  # a prefix of the prefix is someone else
    assert not ck.is_ours(name, "vmdr-ffffffff")
    assert not ck.is_ours("virtnbdbackup.0", P)


def test_build_xml_roundtrip() -> None:
    xml = ck.build_xml("c1", [QCOW, RAW], ["vda"])
    info = ck.parse_checkpoint(xml)
    assert info.bitmaps == {"vda": False}  # no size attribute: not sized by libvirt
    assert info.sizes == {"vda": 1 << 30}
    assert "checkpoint=\"no\"" in xml and "vdb" in xml


def _sized(xml: str) -> str:
    return xml.replace('checkpoint="bitmap"', 'checkpoint="bitmap" size="0"')


def test_decide_incremental_ok_and_raw_full() -> None:
    name = f"{P}-20260101T000000.000Z"
    sized = _sized(ck.build_xml(name, [QCOW, RAW], ["vda"]))
    d = ck.decide([QCOW, RAW], P, name, sized)
    assert d["vda"] is None
    assert "cannot carry a dirty bitmap" in (d["vdb"] or "")


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("no-from", "no previous checkpoint"),
        ("foreign", "is not a vmdr-1a2b3c4d checkpoint"),
        ("missing", "missing in libvirt"),
        ("broken", "missing or broken"),
        ("added", "not in checkpoint"),
        ("resized", "size changed"),
        ("readonly", "cannot carry"),
    ],
)
def test_decide_forces_full(case: str, expect: str) -> None:
    name = f"{P}-20260101T000000.000Z"
    disk = QCOW
    inc_from: str | None = name
    sized: str | None = _sized(ck.build_xml(name, [QCOW], ["vda"]))
    if case == "no-from":
        inc_from = None
    elif case == "foreign":
        inc_from = "vmdr-99999999-20260101T000000.000Z"
    elif case == "missing":
        sized = None
    elif case == "broken":
        sized = ck.build_xml(name, [QCOW], ["vda"])
    elif case == "added":
        sized = _sized(ck.build_xml(name, [QCOW], []))
    elif case == "resized":
        disk = replace(QCOW, virtual_size=2 << 30)
    elif case == "readonly":
        disk = replace(QCOW, readonly=True)
    reason = ck.decide([disk], P, inc_from, sized)["vda"]
    assert reason is not None and expect in reason


def test_delete_others_keeps_other_prefixes(fake: Any) -> None:
    dom = fl.add_domain(fl.domain_xml("d", fl.disk_xml("vda", "/a.qcow2")))
    for n in [f"{P}-20260101T000000.000Z", f"{P}-20260102T000000.000Z", f"{P}-20260103T000000.000Z",
              "vmdr-ffffffff-20260101T000000.000Z", "manual"]:
        dom.checkpointCreateXML(ck.build_xml(n, [QCOW], ["vda"]), 0)
    dom.broken_bitmaps.add((f"{P}-20260101T000000.000Z", "vda"))  # needs METADATA_ONLY
    assert ck.list_ours(dom, P) == [f"{P}-20260101T000000.000Z", f"{P}-20260102T000000.000Z",
                                    f"{P}-20260103T000000.000Z"]
    deleted = ck.delete_others(dom, P, f"{P}-20260103T000000.000Z")
    assert deleted == [f"{P}-20260101T000000.000Z", f"{P}-20260102T000000.000Z"]
    assert sorted(dom.checkpoints) == sorted([f"{P}-20260103T000000.000Z",
                                              "vmdr-ffffffff-20260101T000000.000Z", "manual"])
    assert not ck.delete(dom, "nope")


def test_sized_xml_missing_and_present(fake: Any) -> None:
    dom = fl.add_domain(fl.domain_xml("d", fl.disk_xml("vda", "/a.qcow2")))
    assert ck.sized_xml(dom, "nope") is None
    dom.checkpointCreateXML(ck.build_xml("c", [QCOW], ["vda"]), 0)
    assert ck.parse_checkpoint(ck.sized_xml(dom, "c") or "").bitmaps == {"vda": True}
    dom.broken_bitmaps.add(("c", "vda"))
    assert ck.parse_checkpoint(ck.sized_xml(dom, "c") or "").bitmaps == {"vda": False}


def test_redefine_validates(fake: Any) -> None:
    dom = fl.add_domain(fl.domain_xml("d", fl.disk_xml("vda", "/a.qcow2")))
    xml = ck.build_xml(f"{P}-20260101T000000.000Z", [QCOW], ["vda"])
    assert ck.redefine(dom, xml, validate=True) == f"{P}-20260101T000000.000Z"
    flags = fl.calls("checkpointCreateXML")[-1][1]
    assert flags == fl.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE | \
        fl.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    dom.checkpoints.clear()
    dom.broken_bitmaps.add((f"{P}-20260101T000000.000Z", "vda"))
    with pytest.raises(CheckpointMissing):
        ck.redefine(dom, xml, validate=True)


def test_redefine_drops_a_missing_parent() -> None:
    from vmdr.hypervisor.checkpoints import drop_missing_parent

    xml = ("<domaincheckpoint><name>vmdr-a-2</name><parent><name>gone.1</name></parent>"
           "<disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>")
    out = drop_missing_parent(xml, {"other"})
    assert "<parent>" not in out and "vmdr-a-2" in out and "bitmap" in out
    assert drop_missing_parent(xml, {"gone.1"}) == xml
    plain = "<domaincheckpoint><name>x</name></domaincheckpoint>"
    assert drop_missing_parent(plain, set()) == plain
