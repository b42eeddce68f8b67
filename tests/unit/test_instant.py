"""Instant recovery without a hypervisor: XML helpers, the block-copy loop, validation and
the events it reports, against a small fake domain."""

from __future__ import annotations

import os
import types
from datetime import UTC, datetime
from typing import Any

import pytest

from vmdr.errors import HypervisorError, UsageError, VmdrError
from vmdr.events import BytesProgress, JobEvents, ListSink, PhaseStarted
from vmdr.hypervisor import Domain, mirror
from vmdr.hypervisor.fake import FakeDomainRecord, FakeFleet
from vmdr.jobs import instant
from vmdr.repository.manifest import Snapshot

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


def _dom(sizes: dict[str, int], step: int | None = 100) -> tuple[FakeDomainRecord, Domain]:
    """A running domain of the fake driver whose copy jobs advance ``step`` bytes per
    status call."""
    hv = FakeFleet.simulated(1).connect("fake://host01/system")
    rec = hv.host.add_domain(_xml(**dict.fromkeys(sizes, "nbd")), active=True, sizes=sizes)
    rec.copy_step = step
    return rec, hv.lookup("x")


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
    rec, dom = _dom({"vda": 300, "vdb": 250})
    sink = ListSink()
    opts = instant.InstantOptions(name="x", bandwidth=1 << 20, poll=0)
    instant._migrate(dom, _state(str(tmp_path), ["vda", "vdb"]), opts,
                     JobEvents(sink, interval=0), FakeServer())
    assert mirror.nbd_backed_disks(dom.xml()) == []  # both pivoted onto their copies
    assert mirror.disk_sources(dom.xml(inactive=True)) == {
        "vda": f"{tmp_path}/vda.qcow2", "vdb": f"{tmp_path}/vdb.qcow2"}
    done = [e for e in sink.of(BytesProgress) if e.item == "x/vdb"]
    assert [e.done for e in done] == [100, 200, 250, 250] and done[-1].final
    assert done[-1].total == 250
    last = sink.events[-1]
    assert isinstance(last, PhaseStarted) and last.phase == "pivot"
    assert not rec.copies


def test_migrate_skips_disks_already_local(tmp_path: Any) -> None:
    rec, dom = _dom({"vda": 100, "vdb": 100})
    rec.xml = _xml(vda="local", vdb="nbd")
    started = [e.item for e in _events_of_migrate(dom, tmp_path).of(PhaseStarted)
               if e.phase == "copy"]
    assert started == ["x/vdb"]


def _events_of_migrate(dom: Domain, tmp_path: Any) -> ListSink:
    sink = ListSink()
    instant._migrate(dom, _state(str(tmp_path), ["vda", "vdb"]),
                     instant.InstantOptions(name="x", poll=0), JobEvents(sink), FakeServer())
    return sink


@pytest.mark.parametrize("case", ["ioerror", "job-gone", "server-dead"])
def test_migrate_stops_on_trouble(tmp_path: Any, case: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rec, dom = _dom({"vda": 10_000})
    server = FakeServer(alive=case != "server-dead")
    if case == "ioerror":
        rec.pause_on_io_error()
    sink = ListSink()
    if case == "job-gone":
        rec.failing_copies.add("vda")
        monkeypatch.setattr(instant.time, "sleep", lambda s: None)
    with pytest.raises(VmdrError) as ei:
        instant._migrate(dom, _state(str(tmp_path), ["vda"]),
                         instant.InstantOptions(name="x", poll=0), JobEvents(sink), server)
    assert {"ioerror": "unreachable", "job-gone": "failed",
            "server-dead": "NBD server"}[case] in ei.value.message
    assert mirror.nbd_backed_disks(dom.xml()) == ["vda"]  # not pivoted
    if case == "job-gone":  # restarted COPY_RETRIES times before giving up
        started = [e for e in sink.of(PhaseStarted) if e.phase == "copy"]
        assert len(started) == 1 + instant.COPY_RETRIES


def test_migrate_failures_of_the_hypervisor_are_vmdr_errors(tmp_path: Any) -> None:
    """A libvirt failure while moving disks (here isActive/XMLDesc) is a HypervisorError
    with its message, not an internal error."""
    from tests.unit import fakelibvirt as fl
    from vmdr.hypervisor import connect

    fl.install()
    try:
        raw = fl.add_domain(_xml(vda="nbd"), sizes={"vda": 100})
        dom = connect().lookup("x")
        for method in ("isActive", "XMLDesc"):
            raw.fail = {method: fl.libvirtError(f"{method}: cannot reach QEMU",
                                                fl.VIR_ERR_INTERNAL_ERROR)}
            with pytest.raises(HypervisorError, match=f"{method}: cannot reach QEMU") as ei:
                _events_of_migrate(dom, tmp_path)
            assert ei.value.exit_code == 10
    finally:
        fl.uninstall()


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
