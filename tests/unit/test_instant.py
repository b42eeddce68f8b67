"""Instant recovery without a hypervisor: XML helpers, the block-copy loop, validation and
the progress renderer, against a small fake domain."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from vmdr.errors import HypervisorError, UsageError, VmdrError
from vmdr.events import BytesProgress, JobEvents, ListSink, PhaseStarted
from vmdr.hypervisor import _compat, mirror
from vmdr.jobs import instant
from vmdr.repository.manifest import Snapshot


class LvError(Exception):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code

    def get_error_code(self) -> int:
        return self.code

    def get_int1(self) -> int:
        return -1


FAKE = types.SimpleNamespace(
    libvirtError=LvError, VIR_ERR_BLOCK_COPY_ACTIVE=83, VIR_ERR_OPERATION_INVALID=55,
    VIR_ERR_INTERNAL_ERROR=1, VIR_ERR_NO_DOMAIN=42,
    VIR_DOMAIN_BLOCK_COPY_BANDWIDTH="bandwidth", VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB=4,
    VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT=2, VIR_DOMAIN_RUNNING=1, VIR_DOMAIN_PAUSED=3,
    VIR_DOMAIN_PAUSED_IOERROR=5, VIR_DOMAIN_XML_INACTIVE=2)

NBD_DISK = """<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/d/{t}.overlay.qcow2'/><backingStore type='network'><format type='raw'/>
<source protocol='nbd' name='{t}'><host transport='unix' socket='/run/s/{t}.sock'/></source>
</backingStore><target dev='{t}' bus='virtio'/></disk>"""
LOCAL_DISK = """<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/d/{t}.qcow2'/><target dev='{t}' bus='virtio'/></disk>"""


def _xml(**disks: str) -> str:
    body = "".join((NBD_DISK if kind == "nbd" else LOCAL_DISK).format(t=t)
                   for t, kind in disks.items())
    return f"<domain><name>x</name><devices>{body}</devices></domain>"


@pytest.fixture(autouse=True)
def fake_libvirt() -> Iterator[None]:
    _compat.install(FAKE)
    yield
    _compat._libvirt = None
    _compat._libvirt_qemu = None


class FakeDom:
    """A domain whose copy jobs advance by ``step`` bytes per blockJobInfo call."""

    def __init__(self, sizes: dict[str, int], step: int = 100) -> None:
        self.sizes = sizes
        self.step = step
        self.jobs: dict[str, int] = {}
        self.pivoted: set[str] = set()
        self.state_ = [1, 0]
        self.copies: list[tuple[str, str, Any, int]] = []
        self.fail_job: str | None = None

    def name(self) -> str:
        return "x"

    def isActive(self) -> int:
        return 1

    def state(self, _flags: int = 0) -> list[int]:
        return self.state_

    def XMLDesc(self, _flags: int = 0) -> str:
        return _xml(**{d: "local" if d in self.pivoted else "nbd" for d in self.sizes})

    def blockCopy(self, disk: str, xml: str, params: Any, flags: int) -> None:
        self.copies.append((disk, xml, params, flags))
        self.jobs[disk] = 0

    def blockJobInfo(self, disk: str, _flags: int) -> dict[str, int]:
        if disk not in self.jobs or disk == self.fail_job:
            return {}
        self.jobs[disk] = min(self.sizes[disk], self.jobs[disk] + self.step)
        return {"cur": self.jobs[disk], "end": self.sizes[disk], "type": 2, "bandwidth": 0}

    def blockJobAbort(self, disk: str, flags: int) -> None:
        if flags & 2:
            if self.jobs[disk] < self.sizes[disk]:
                raise LvError("not ready", 83)
            self.pivoted.add(disk)
        del self.jobs[disk]

    def suspend(self) -> None:
        self.state_ = [3, 1]


class FakeServer:
    def __init__(self, alive: bool = True) -> None:
        self._alive = alive

    def alive(self) -> bool:
        return self._alive


def _state(tmp: str, disks: list[str]) -> dict[str, Any]:
    return {"vm": "x", "disks": {d: {"target": f"{tmp}/{d}.qcow2", "overlay": "o"}
                                 for d in disks}}


def test_error_policy_and_nbd_detection() -> None:
    xml = mirror.set_error_policy(_xml(vda="nbd", vdb="local"), ["vda"])
    assert "error_policy=\"stop\"" in xml and "rerror_policy=\"stop\"" in xml
    assert xml.count("error_policy") == 2  # only vda's driver (error_ + rerror_)
    assert mirror.nbd_backed_disks(xml) == ["vda"]
    before = mirror.error_policies(_xml(vda="nbd"), ["vda"])
    assert before == {"vda": {"error_policy": None, "rerror_policy": None}}
    back = mirror.with_error_policies(xml, before)
    assert "error_policy" not in back and "type=\"qcow2\"" in back
    assert mirror.disk_sources(xml) == {"vda": "/d/vda.overlay.qcow2", "vdb": "/d/vdb.qcow2"}


def test_migrate_copies_reports_and_pivots(tmp_path: Any) -> None:
    dom = FakeDom({"vda": 300, "vdb": 250})
    sink = ListSink()
    opts = instant.InstantOptions(name="x", bandwidth=1 << 20, poll=0)
    instant._migrate(dom, _state(str(tmp_path), ["vda", "vdb"]), opts,
                     JobEvents(sink, interval=0), FakeServer())
    assert dom.pivoted == {"vda", "vdb"}
    _disk, xml, params, flags = dom.copies[0]
    assert flags == FAKE.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB  # full copy: not SHALLOW
    assert params == {"bandwidth": 1 << 20} and f"{tmp_path}/vda.qcow2" in xml
    done = [e for e in sink.of(BytesProgress) if e.item == "x/vdb"]
    assert [e.done for e in done] == [100, 200, 250, 250] and done[-1].final
    assert done[-1].total == 250
    last = sink.events[-1]
    assert isinstance(last, PhaseStarted) and last.phase == "pivot"


def test_migrate_skips_disks_already_local(tmp_path: Any) -> None:
    dom = FakeDom({"vda": 100, "vdb": 100})
    dom.pivoted.add("vda")
    instant._migrate(dom, _state(str(tmp_path), ["vda", "vdb"]),
                     instant.InstantOptions(name="x", poll=0), JobEvents(), FakeServer())
    assert [c[0] for c in dom.copies] == ["vdb"]


@pytest.mark.parametrize("case", ["ioerror", "job-gone", "server-dead"])
def test_migrate_stops_on_trouble(tmp_path: Any, case: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dom = FakeDom({"vda": 10_000})
    server = FakeServer(alive=case != "server-dead")
    if case == "ioerror":
        dom.state_ = [3, 5]
    if case == "job-gone":
        dom.fail_job = "vda"
        monkeypatch.setattr(instant.time, "sleep", lambda s: None)
    with pytest.raises(VmdrError) as ei:
        instant._migrate(dom, _state(str(tmp_path), ["vda"]),
                         instant.InstantOptions(name="x", poll=0), JobEvents(), server)
    assert {"ioerror": "unreachable", "job-gone": "failed",
            "server-dead": "NBD server"}[case] in ei.value.message
    assert not dom.pivoted
    if case == "job-gone":  # restarted COPY_RETRIES times before giving up
        assert len(dom.copies) == 1 + instant.COPY_RETRIES


def test_resume_after_io_error_retries_until_it_stays_up() -> None:
    states = iter([[3, 5], [3, 5], [1, 0], [1, 0]])
    dom = types.SimpleNamespace(resumed=0)
    cur = {"s": [3, 5]}

    def state(_f: int = 0) -> list[int]:
        return cur["s"]

    def resume() -> None:
        dom.resumed += 1
        cur["s"] = next(states)

    dom.state, dom.resume, dom.name = state, resume, lambda: "x"
    mirror.resume_after_io_error(dom, sleep=lambda s: None)
    assert dom.resumed >= 2 and cur["s"] == [1, 0]
    cur["s"] = [3, 5]
    dom.resume = lambda: None  # never comes back
    with pytest.raises(HypervisorError, match="still unreachable"):
        mirror.resume_after_io_error(dom, attempts=3, sleep=lambda s: None)


def test_pivot_not_ready_is_false_other_errors_raise() -> None:
    dom = FakeDom({"vda": 1000})
    dom.jobs["vda"] = 0
    assert mirror.pivot(dom, "vda") is False

    def boom(_d: str, _f: int) -> None:
        raise LvError("disk gone", 1)

    dom.blockJobAbort = boom  # type: ignore[method-assign]
    with pytest.raises(HypervisorError, match="pivoting disk vda: disk gone"):
        mirror.pivot(dom, "vda")


class FakeHv:
    local = True
    system = False
    uri = "qemu:///session"

    def domain(self, name: str) -> None:
        from vmdr.errors import DomainNotFound

        raise DomainNotFound(name)


def _snap(kind: str = "vm") -> Snapshot:
    return Snapshot(name="web", time=datetime.now(UTC), chunk_size=4 << 20,
                    meta={"kind": kind}, id="ab" * 32)


def test_plan_validates(tmp_path: Any) -> None:
    hv: Any = FakeHv()
    with pytest.raises(UsageError, match="image snapshot"):
        instant._plan(_snap("image"), instant.InstantOptions(name="n"), hv)
    with pytest.raises(UsageError, match="invalid VM name"):
        instant._plan(_snap(), instant.InstantOptions(name="../evil"), hv)
    hv.local = False
    with pytest.raises(UsageError, match="local libvirt"):
        instant._plan(_snap(), instant.InstantOptions(name="n"), hv)


def test_resume_without_state_is_a_usage_error(tmp_path: Any) -> None:
    with pytest.raises(UsageError, match="no unfinished instant restore"):
        instant.instant_resume(Any, "n",  # type: ignore[arg-type]
                               instant.InstantOptions(name="n", target_dir=str(tmp_path)),
                               FakeHv(), JobEvents())  # type: ignore[arg-type]


SRC_XML = ("<domain type='qemu'><name>web</name><os><type>hvm</type></os><devices>"
           "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           "<source file='/old/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>"
           "<serial type='pty'><log file='/old/console.log'/></serial></devices></domain>")


def test_failure_before_boot_leaves_nothing(tmp_path: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """define fails: the server is stopped and overlays and the state file are removed."""
    from vmdr.repository.manifest import ChunkList, DiskRecord

    snap = _snap()
    snap.meta["config"] = {"domain_xml": SRC_XML}
    snap.disks = [DiskRecord("vda", 1 << 20, ChunkList.holes(1))]
    server = types.SimpleNamespace(exports={"vda": "nbd+unix:///vda?socket=/nowhere.sock"},
                                   stopped=False)
    server.stop = lambda: setattr(server, "stopped", True)
    monkeypatch.setattr("vmdr.serve.start_server", lambda *a, **k: server)
    monkeypatch.setattr(instant, "SOCKET_ROOT", str(tmp_path / "run" / "instant"))
    defined: list[str] = []

    def define(xml: str) -> str:
        defined.append(xml)
        raise HypervisorError("defining domain: bad XML")

    hv: Any = FakeHv()
    hv.define = define
    target = tmp_path / "t"
    with pytest.raises(HypervisorError, match="bad XML"):
        instant.instant_restore(Any, snap, instant.InstantOptions(  # type: ignore[arg-type]
            name="web-now", target_dir=str(target)), hv, JobEvents())
    assert server.stopped and os.listdir(target) == []
    xml = defined[0]  # what would have been defined: overlays, stop policy, new console log
    assert f"{target}/web-now-vda.overlay.qcow2" in xml and "rerror_policy=\"stop\"" in xml
    assert f"{target}/web-now-console.log" in xml and "<name>web-now</name>" in xml
