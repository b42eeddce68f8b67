"""``vmdr ha test`` killed mid-test: production stays on the temporary overlay and the copy
keeps running until the next ``ha test`` of the VM (or ``--recover``) undoes it."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmdr.errors import VMLocked
from vmdr.ha import hatest, hatest_state
from vmdr.hypervisor.fake import FakeHypervisor

from .test_ha_ops import Fleet, fl, kinds

__all__ = ["fl"]  # the fixture, re-exported for pytest


def _touch(path: str, *_: str) -> None:
    Path(path).write_bytes(b"qcow2 overlay")


@pytest.fixture
def killed(fl: Fleet, tmp_path: Path) -> Iterator[tuple[Fleet, threading.Thread]]:
    """An ``ha test`` of db1 frozen for good right after its copy booted on h3: like a
    ``kill -9`` there, none of its clean-up runs (the thread is parked, never resumed)."""
    park = threading.Event()
    booted = threading.Event()
    real = FakeHypervisor.create_transient

    def boot_then_die(self: FakeHypervisor, xml: str) -> Any:
        d = real(self, xml)
        booted.set()
        park.wait()  # never set: the process is "dead" from here on
        return d

    FakeHypervisor.create_transient = boot_then_die  # type: ignore[method-assign]
    t = threading.Thread(target=hatest.run_test, daemon=True, args=(
        fl.inv, fl.policy, fl.records, fl.connect, "db1"),
        kwargs={"make_overlay": _touch, "evidence_dir": str(tmp_path)})
    try:
        t.start()
        assert booted.wait(10)
    finally:
        FakeHypervisor.create_transient = real  # type: ignore[method-assign]
    yield fl, t


def _copies(f: Fleet) -> list[str]:
    return [n for n in f.host("h3").domains if n.startswith(hatest.PREFIX)]


def test_state_file_is_written_before_the_freeze_0600(killed: tuple[Fleet, Any]) -> None:
    f, _t = killed
    st_path = hatest_state.state_path(str(f.shared), "db1")
    assert stat.S_IMODE(os.stat(st_path).st_mode) == 0o600
    st = hatest_state.read_state(str(f.shared), "db1")
    assert st is not None and (st.source, st.target, st.pid) == ("h1", "h3", os.getpid())
    assert st.originals == {"vda": (str(f.shared / "db1.qcow2"), "qcow2")}
    assert f.host("h1").domains["db1"].frozen == 1  # production on the overlay
    assert _copies(f) == [st.copy]
    # the run is still "alive" (our own pid, not a vmdr command line: so ask alive=)
    with pytest.raises(VMLocked, match="failover test of db1 is running"):
        hatest.recover_vm(f.inv, f.records, f.connect, "db1", alive=lambda s: True)


def test_recover_merges_production_back_and_destroys_the_copy(
        killed: tuple[Fleet, Any]) -> None:
    f, _t = killed
    st = hatest_state.read_state(str(f.shared), "db1")
    assert st is not None
    leftovers = sorted(p.name for p in f.shared.iterdir() if p.name.startswith(st.copy))
    assert leftovers == [f"{st.copy}-vda.qcow2"]  # the copy's overlay
    done = hatest.recover_vm(f.inv, f.records, f.connect, "db1", alive=lambda s: False)
    assert f.host("h1").domains["db1"].frozen == 0  # back on its own image
    assert _copies(f) == []
    assert any("merged leftover overlay of vda" in d for d in done)
    assert any(f"destroyed the throw-away copy {st.copy} on h3" in d for d in done)
    assert sorted(p.name for p in f.shared.iterdir()) == []  # state, overlays: gone
    assert kinds(f.records) == ["restored"]
    assert f.where()["db1"] == "h1"  # production kept running throughout
    assert hatest.recover_vm(f.inv, f.records, f.connect, "db1",
                             alive=lambda s: False) == []  # nothing left: idempotent


def test_next_ha_test_recovers_first_then_passes(killed: tuple[Fleet, Any],
                                                  tmp_path: Path) -> None:
    f, _t = killed
    f.now += 1
    real = FakeHypervisor.create_transient

    def answering(self: FakeHypervisor, xml: str) -> Any:
        d = real(self, xml)
        self.host.domains[d.name].agent = True
        return d

    FakeHypervisor.create_transient = answering  # type: ignore[method-assign]
    try:
        res = hatest.run_test(f.inv, f.policy, f.records, f.connect, "db1",
                              make_overlay=_touch, evidence_dir=str(tmp_path),
                              alive=lambda s: False)
    finally:
        FakeHypervisor.create_transient = real  # type: ignore[method-assign]
    assert res.ok, res.error
    assert any("merged leftover overlay" in d for d in res.recovered)
    assert res.to_json()["recovered"] == res.recovered
    assert f.host("h1").domains["db1"].frozen == 0 and _copies(f) == []
    assert not os.path.exists(hatest_state.state_path(str(f.shared), "db1"))


def test_owner_alive_rules() -> None:
    st = hatest_state.TestState("db1", "h1", "h3", "c", "/x", host="other", pid=1,
                                started=0.0, until=100.0)
    from datetime import UTC, datetime
    assert hatest_state.owner_alive(st, now=lambda: datetime.fromtimestamp(50, UTC))
    assert not hatest_state.owner_alive(st, now=lambda: datetime.fromtimestamp(150, UTC))
    st.host, st.pid = os.uname().nodename, 2 ** 22 + 7  # no such pid here
    assert not hatest_state.owner_alive(st)


def test_marks_agree() -> None:
    from vmdr.hypervisor import overlay
    assert hatest_state.HATEST_MARK == overlay.HATEST_MARK


def test_an_overlay_already_pivoted_but_not_deleted_goes_too(
        killed: tuple[Fleet, Any]) -> None:
    f, _t = killed
    left = f.shared / f"db1-vda{hatest_state.HATEST_MARK}"
    left.write_bytes(b"merged already")
    other = f.shared / f"db1-x-vda{hatest_state.HATEST_MARK}"  # another VM's: kept
    other.write_bytes(b"in use")
    done = hatest.recover_vm(f.inv, f.records, f.connect, "db1", alive=lambda s: False)
    assert f"deleted {left}" in done and not left.exists() and other.exists()


class _LvDom:
    """The libvirt calls overlay.merge_leftovers makes, on a domain left on its overlay
    (live and persistent definition, as an external disk-only snapshot leaves it)."""

    def __init__(self, img: str, ov: str, *, active: bool = True) -> None:
        self.img, self.ov, self.active = img, ov, active
        self.live = self.inactive = ov
        self.job: dict[str, int] | None = None
        self.defined: list[str] = []

    def _xml(self, src: str) -> str:
        return (f"<domain><name>db1</name><devices><disk type='file' device='disk'>"
                f"<driver name='qemu' type='qcow2'/><source file='{src}'/>"
                "<target dev='vda'/></disk></devices></domain>")

    def isActive(self) -> bool:
        return self.active

    def isPersistent(self) -> bool:
        return True

    def XMLDesc(self, flags: int) -> str:
        return self._xml(self.inactive if flags & 2 else self.live)

    def blockJobInfo(self, target: str, flags: int) -> dict[str, int]:
        return self.job or {}

    def blockCommit(self, *a: Any) -> None:
        self.job = {"cur": 10, "end": 10}

    def blockJobAbort(self, target: str, flags: int) -> None:
        assert flags == 2  # pivot
        self.live, self.job = self.img, None  # libvirt leaves the persistent def alone

    def connect(self) -> Any:
        return self

    def defineXML(self, xml: str) -> None:
        self.defined.append(xml)
        self.inactive = self.img


def test_libvirt_merge_commits_pivots_and_fixes_the_definition(tmp_path: Path) -> None:
    from vmdr.hypervisor import overlay
    img = str(tmp_path / "db1.qcow2")
    ov = str(tmp_path / f"db1-vda{overlay.HATEST_MARK}")
    Path(ov).write_bytes(b"x")
    dom = _LvDom(img, ov)
    done = overlay.merge_leftovers(dom, str(tmp_path), overlay.HATEST_MARK,
                                   {"vda": (img, "qcow2")})
    assert dom.live == img and dom.inactive == img and not os.path.exists(ov)
    assert len(dom.defined) == 1 and img in dom.defined[0] and ov not in dom.defined[0]
    assert [d.split(" (")[0] for d in done] == [
        "merged leftover overlay of vda into its image",
        f"pointed the definition of vda back at {img}"]
    assert overlay.merge_leftovers(dom, str(tmp_path), overlay.HATEST_MARK, {}) == []
    # a backup's overlay (other name) is not touched
    bk = str(tmp_path / f"vda{overlay.OVERLAY_SUFFIX}")
    assert overlay.merge_leftovers(_LvDom(img, bk), str(tmp_path), overlay.HATEST_MARK,
                                   {}) == []
