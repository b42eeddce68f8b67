"""What only the in-memory driver does: fleets, hosts going down, many threads at once.
(What it shares with the libvirt driver is in test_hypervisor_contract.py.)"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import DomainNotFound, HypervisorError, HypervisorUnavailable
from vmdr.hypervisor import Screenshot
from vmdr.hypervisor.fake import FakeFleet


def test_a_fleet_of_fifty_hosts_in_parallel() -> None:
    fleet = FakeFleet.simulated(50)
    assert len(fleet.hosts) == 50 and "fake://host07/system" in fleet.hosts

    def boot(uri: str) -> list[str]:
        with fleet.connect(uri) as hv:
            for i in range(4):
                hv.define(fl.domain_xml(f"vm{i}", fl.disk_xml("vda", f"/d/vm{i}.qcow2")))
                hv.start(f"vm{i}")
            return [n for n in hv.list_domains() if hv.lookup(n).is_active()]

    with ThreadPoolExecutor(8) as pool:
        running = list(pool.map(boot, sorted(fleet.hosts)))
    assert running == [["vm0", "vm1", "vm2", "vm3"]] * 50


def test_a_host_that_goes_down() -> None:
    fleet = FakeFleet.simulated(2)
    host = fleet.hosts["fake://host01/system"]
    host.add_domain(fl.domain_xml("web", ""), active=True)
    hv = fleet.connect(host.uri)
    dom = hv.lookup("web")
    host.up = False
    with pytest.raises(HypervisorUnavailable):
        dom.is_active()
    with pytest.raises(HypervisorUnavailable):
        fleet.connect(host.uri)
    with pytest.raises(HypervisorUnavailable):
        fleet.connect("fake://nowhere/system")
    host.up = True
    assert dom.is_active()  # the same handle works again
    hv.close()
    with pytest.raises(HypervisorUnavailable, match="closed"):
        hv.list_domains()


def test_handles_follow_their_domain() -> None:
    fleet = FakeFleet.simulated(1)
    hv = fleet.connect("fake://host01/system")
    hv.define(fl.domain_xml("a", ""))
    dom = hv.lookup("a")
    dom.undefine()
    with pytest.raises(DomainNotFound):
        dom.is_active()
    dom.destroy()  # gone: nothing to destroy


def test_resume_after_io_error_retries_until_it_stays_up() -> None:
    """QEMU may pause the guest once more while its NBD client reconnects."""
    fleet = FakeFleet.simulated(1)
    host = fleet.hosts["fake://host01/system"]
    rec = host.add_domain(fl.domain_xml("x", ""), active=True)
    dom = fleet.connect(host.uri).lookup("x")
    rec.pause_on_io_error()
    pauses = iter([True, False])

    def settle(_s: float) -> None:  # the first resume does not last
        if next(pauses, False):
            rec.pause_on_io_error()

    dom.resume_after_io_error(sleep=settle)
    assert dom.state() == "running"
    rec.pause_on_io_error()
    with pytest.raises(HypervisorError, match="still unreachable"):
        dom.resume_after_io_error(attempts=3, sleep=lambda s: rec.pause_on_io_error())


def test_verify_sandboxes_on_the_fake_driver(tmp_path: Path) -> None:
    """serve.sandbox through the driver interface: the screenshot becomes PNG, a sandbox of
    a dead vmdr is destroyed (files and domain), a live one and foreign domains are kept."""
    from vmdr.serve import sandbox as sb
    from vmdr.serve.png import PNG_SIGNATURE

    fleet = FakeFleet.simulated(1)
    hv = fleet.connect("fake://host01/system")
    meta = ("<metadata><vmdrverify:sandbox xmlns:vmdrverify='urn:vmdr:verify' pid='{pid}' "
            "dir='/x'/></metadata>")

    def sandbox_xml(name: str, pid: int) -> str:
        return fl.domain_xml(name, "").replace("</domain>", meta.format(pid=pid) + "</domain>")

    box = hv.start_sandbox(sandbox_xml("vmdr-verify-mine", os.getpid()))
    fleet.hosts[hv.uri].domains["vmdr-verify-mine"].screen = Screenshot(
        "image/x-portable-pixmap", b"P6\n2 1\n255\n" + b"\xff\0\0\0\xff\0")
    png = sb.screenshot_png(box.domain)
    assert png.startswith(PNG_SIGNATURE)

    dead_pid = 2**22 + 17
    hv.define(sandbox_xml("vmdr-verify-orphan", dead_pid))
    hv.start("vmdr-verify-orphan")
    hv.define(sandbox_xml("prod-db", dead_pid))  # not ours by name: never touched
    gone = Path(sb.make_sandbox(str(tmp_path), "vmdr-verify-gone", None))
    sb.write_state(str(gone), sb.SandboxState("vmdr-verify-gone", "", pid=dead_pid,
                                              starttime="1"))
    done = sb.cleanup_leftovers(hv, str(tmp_path))
    assert done == [f"removed {gone}", "destroyed orphan vmdr-verify-orphan"]
    assert hv.list_domains() == ["prod-db", "vmdr-verify-mine"]
    st = sb.SandboxState("vmdr-verify-mine", box.domain.uuid)
    assert sb.destroy_domain(hv, st) == ["destroyed vmdr-verify-mine"]
    assert sb.destroy_domain(hv, st) == []  # gone: nothing to do
    assert hv.list_domains() == ["prod-db"]
