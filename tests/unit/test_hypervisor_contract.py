"""One contract for every hypervisor driver: the libvirt driver (over tests/unit/fakelibvirt)
and the in-memory fake driver (vmdr.hypervisor.fake) must behave alike through
vmdr.hypervisor.driver. Each test runs once per driver; a :class:`Harness` sets up what
only a test may touch (a guest agent that answers, a screen, a network)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import (
    DomainNotFound,
    HypervisorError,
    HypervisorUnsupported,
    NetworkNotFound,
    UsageError,
)
from vmdr.hypervisor import Hypervisor, Screenshot, connect
from vmdr.hypervisor.fake import FakeFleet, FakeHost

NBD_DISK = ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            "<source file='/d/{t}.overlay.qcow2'/><backingStore type='network'>"
            "<format type='raw'/><source protocol='nbd' name='{t}'>"
            "<host transport='unix' socket='/run/s/{t}.sock'/></source></backingStore>"
            "<target dev='{t}' bus='virtio'/></disk>")


def xml(name: str, *disks: str, console: str | None = None) -> str:
    serial = (f"<serial type='pty'><log file='{console}'/><target port='0'/></serial>"
              if console else "")
    return fl.domain_xml(name, "".join(NBD_DISK.format(t=t) for t in disks), extra=serial)


class Harness(ABC):
    hv: Hypervisor

    @abstractmethod
    def add(self, xml: str, *, active: bool = False, sizes: dict[str, int] | None = None,
            agent: bool = False) -> None: ...

    @abstractmethod
    def add_network(self, name: str, *, forward: bool = False, active: bool = True) -> None: ...

    @abstractmethod
    def set_screen(self, name: str, shot: Screenshot) -> None: ...

    @abstractmethod
    def set_addresses(self, name: str, addrs: list[str]) -> None: ...

    @abstractmethod
    def pause_on_io_error(self, name: str) -> None: ...

    @abstractmethod
    def copy_done(self, name: str, disk: str) -> None:
        """Let the copy of ``disk`` catch up."""

    @abstractmethod
    def reconnect(self) -> Hypervisor: ...


class LibvirtHarness(Harness):
    def __init__(self) -> None:
        fl.host()
        self.hv = connect()

    def add(self, xml: str, *, active: bool = False, sizes: dict[str, int] | None = None,
            agent: bool = False) -> None:
        dom = fl.add_domain(xml, active=active, sizes=sizes)
        dom.agent = (lambda cmd: {}) if agent else None

    def add_network(self, name: str, *, forward: bool = False, active: bool = True) -> None:
        fl.add_network(name, forward=forward, active=active)

    def set_screen(self, name: str, shot: Screenshot) -> None:
        fl.host().domains[name].screen = (shot.mime, shot.data)

    def set_addresses(self, name: str, addrs: list[str]) -> None:
        fl.host().domains[name].addresses = {fl.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE: {
            "lo": {"addrs": [{"type": fl.VIR_IP_ADDR_TYPE_IPV4, "addr": "127.0.0.1"}]},
            "vnet0": {"addrs": [{"type": fl.VIR_IP_ADDR_TYPE_IPV4, "addr": a} for a in addrs]}}}

    def pause_on_io_error(self, name: str) -> None:
        fl.host().domains[name].paused = fl.VIR_DOMAIN_PAUSED_IOERROR

    def copy_done(self, name: str, disk: str) -> None:
        dom = fl.host().domains[name]
        dom.copy_progress(disk, dom.copies[disk][4])

    def reconnect(self) -> Hypervisor:
        return connect()


class FakeHarness(Harness):
    def __init__(self) -> None:
        self.fleet = FakeFleet.simulated(1)
        self.uri = "fake://host01/system"
        self.hv = self.fleet.connect(self.uri)

    @property
    def host(self) -> FakeHost:
        return self.fleet.hosts[self.uri]

    def add(self, xml: str, *, active: bool = False, sizes: dict[str, int] | None = None,
            agent: bool = False) -> None:
        self.host.add_domain(xml, active=active, sizes=sizes).agent = agent

    def add_network(self, name: str, *, forward: bool = False, active: bool = True) -> None:
        self.host.add_network(name, forwards=forward, active=active)

    def set_screen(self, name: str, shot: Screenshot) -> None:
        self.host.domains[name].screen = shot

    def set_addresses(self, name: str, addrs: list[str]) -> None:
        self.host.domains[name].addresses = addrs

    def pause_on_io_error(self, name: str) -> None:
        self.host.domains[name].pause_on_io_error()

    def copy_done(self, name: str, disk: str) -> None:
        self.host.domains[name].copy_step = None

    def reconnect(self) -> Hypervisor:
        return self.fleet.connect(self.uri)


@pytest.fixture(params=["libvirt", "fake"])
def h(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "libvirt":
        fl.install()
        try:
            yield LibvirtHarness()
        finally:
            fl.uninstall()
    else:
        harness = FakeHarness()
        yield harness


def test_lookup_define_and_inspect(h: Harness) -> None:
    with pytest.raises(DomainNotFound):
        h.hv.lookup("nope")
    with pytest.raises(DomainNotFound):
        h.hv.domain("nope")
    assert h.hv.define(xml("b", "vda")) == "b"
    h.add(xml("a", "vda", "vdb"), active=True, sizes={"vda": 10 << 20, "vdb": 5 << 20})
    assert h.hv.list_domains() == ["a", "b"]
    dom = h.hv.lookup("a")
    assert h.hv.lookup(dom.uuid).name == "a"
    info = dom.info()
    assert (info.name, info.uuid, info.state, info.running) == ("a", dom.uuid, "running", True)
    assert info.vcpus == 2 and info.memory_kib == 1048576 and info.persistent
    assert [(d.target, d.virtual_size) for d in info.disks] == [("vda", 10 << 20),
                                                                ("vdb", 5 << 20)]
    b = h.hv.domain("b")
    assert b.state == "stopped" and not b.running and b.live_xml is None
    assert "<name>b</name>" in h.hv.lookup("b").xml(inactive=True)


def test_lifecycle(h: Harness) -> None:
    h.hv.define(xml("vm", "vda"))
    dom = h.hv.lookup("vm")
    assert not dom.is_active() and dom.state() == "stopped" and dom.is_persistent()
    dom.start()
    assert dom.is_active() and dom.state() == "running"
    with pytest.raises(HypervisorError):
        dom.start()  # already running
    dom.suspend()
    assert dom.state() == "paused" and dom.is_active() and not dom.paused_on_io_error()
    dom.suspend()  # no error when paused already
    dom.resume()
    assert dom.state() == "running"
    with pytest.raises(HypervisorError):
        dom.resume()  # not paused
    h.hv.destroy("vm")
    h.hv.destroy("vm")  # no error when off
    assert dom.state() == "stopped"
    dom.suspend()  # no error when off
    h.hv.undefine("vm")
    with pytest.raises(DomainNotFound):
        h.hv.lookup("vm")


def test_define_updates_an_existing_definition(h: Harness) -> None:
    h.hv.define(xml("vm", "vda"))
    uuid = h.hv.lookup("vm").uuid
    h.hv.define(xml("vm", "vda", "vdb").replace("<name>vm</name>",
                                              f"<name>vm</name><uuid>{uuid}</uuid>"))
    assert h.hv.list_domains() == ["vm"]
    assert [d.target for d in h.hv.domain("vm").disks] == ["vda", "vdb"]


def test_io_error_pause_and_resume(h: Harness) -> None:
    h.add(xml("vm", "vda"), active=True)
    dom = h.hv.lookup("vm")
    h.pause_on_io_error("vm")
    assert dom.state() == "paused" and dom.paused_on_io_error()
    dom.resume_after_io_error(sleep=lambda s: None)
    assert dom.state() == "running" and not dom.paused_on_io_error()


def test_block_copy_and_pivot(h: Harness) -> None:
    h.add(xml("vm", "vda", "vdb"), active=True, sizes={"vda": 1 << 20, "vdb": 1 << 20})
    dom = h.hv.lookup("vm")
    assert not dom.block_job("vda").status().active
    dom.block_job("vda").cancel()  # no job: no error
    if isinstance(h, FakeHarness):
        h.host.domains["vm"].copy_step = 1000
    job = dom.block_copy("vda", "/images/vm-vda.qcow2", bandwidth=1 << 20)
    st = job.status()
    assert st.active and st.end == 1 << 20 and not st.ready
    assert job.pivot() is False  # not in sync yet
    with pytest.raises(HypervisorError):
        dom.block_copy("vda", "/images/other.qcow2")  # one job per disk
    h.copy_done("vm", "vda")
    st = dom.block_job("vda").status()
    assert st.ready and st.cur == st.end
    assert dom.block_job("vda").pivot() is True
    assert not dom.block_job("vda").status().active
    for live in (dom.xml(), dom.xml(inactive=True)):
        assert "/images/vm-vda.qcow2" in live and "vda.overlay" not in live
        assert "vdb.overlay" in live
    other = dom.block_copy("vdb", "/images/vm-vdb.qcow2")
    other.cancel()
    assert not other.status().active and "vdb.overlay" in dom.xml()


def test_mirror_bandwidth_set_at_start_and_changed_while_it_runs(h: Harness) -> None:
    h.add(xml("vm", "vda"), active=True, sizes={"vda": 1 << 20})
    dom = h.hv.lookup("vm")
    job = dom.mirror_to_nbd("vda", "/run/x.sock", "vda", bandwidth=3 << 20)
    assert job.status().bandwidth == 3 << 20  # bytes/s, not libvirt's default MiB/s
    job.set_speed(512 << 10)
    assert dom.block_job("vda").status().bandwidth == 512 << 10
    job.set_speed(0)  # unlimited
    assert job.status().bandwidth == 0
    job.cancel()
    with pytest.raises(HypervisorError):
        job.set_speed(1 << 20)  # no job any more
    assert dom.mirror_to_nbd("vda", "/run/x.sock", "vda").status().bandwidth == 0


def test_block_copy_needs_a_running_domain(h: Harness) -> None:
    h.add(xml("vm", "vda"))
    with pytest.raises(HypervisorError):
        h.hv.lookup("vm").block_copy("vda", "/images/x.qcow2")


def test_guest_agent_and_addresses(h: Harness) -> None:
    h.add(xml("quiet", "vda"), active=True)
    h.add(xml("talks", "vda"), active=True, agent=True)
    assert h.hv.lookup("quiet").guest_ping(timeout=1) is False
    assert h.hv.lookup("talks").guest_ping(timeout=1) is True
    assert h.hv.lookup("quiet").guest_addresses() == []
    h.set_addresses("talks", ["10.77.0.5"])
    assert h.hv.lookup("talks").guest_addresses() == ["10.77.0.5"]


def test_heartbeat_through_the_agent_and_the_console(h: Harness, tmp_path: Any) -> None:
    log = tmp_path / "console.log"
    h.add(xml("vm", "vda", console=str(log)), active=True)
    dom = h.hv.lookup("vm")
    con = dom.console()
    assert con.log_path == str(log) and con.read_log() == ""
    log.write_text("booting\nvmdr-guest: heartbeat 1\n")
    assert "heartbeat 1" in con.read_log()
    took = h.hv.wait_heartbeat("vm", agent=False, console_pattern=r"heartbeat \d+",
                               console_log=str(log), timeout=5)
    assert took >= 0
    dom.destroy()
    with pytest.raises(HypervisorError, match="stopped before"):
        h.hv.wait_heartbeat("vm", timeout=1)


def test_screenshot(h: Harness) -> None:
    h.add(xml("vm", "vda"), active=True)
    dom = h.hv.lookup("vm")
    with pytest.raises(HypervisorError):
        dom.console().screenshot()  # no display
    h.set_screen("vm", Screenshot("image/x-portable-pixmap", b"P6\n2 1\n255\n" + b"\0" * 6))
    shot = dom.console().screenshot()
    assert shot.mime == "image/x-portable-pixmap" and shot.data.startswith(b"P6\n2 1\n")


def test_networks(h: Harness) -> None:
    h.add_network("iso")
    h.add_network("nat", forward=True)
    h.add_network("down", active=False)
    with pytest.raises(NetworkNotFound):
        h.hv.network("nope")
    assert h.hv.network("iso").isolated and h.hv.network("iso").active
    assert h.hv.network("nat").forwards and not h.hv.network("down").active
    assert h.hv.isolated_network("iso").name == "iso"
    with pytest.raises(UsageError, match="forwards traffic"):
        h.hv.isolated_network("nat")
    with pytest.raises(UsageError, match="not active"):
        h.hv.isolated_network("down")


def test_autostart_of_a_defined_domain_and_none_for_a_transient_one(h: Harness) -> None:
    h.add(xml("web", "vda"))
    dom = h.hv.lookup("web")
    assert not dom.autostart()
    dom.set_autostart(True)
    assert h.hv.lookup("web").autostart()  # a fresh handle sees it
    dom.set_autostart(False)
    assert not dom.autostart()
    sb = h.hv.start_sandbox(xml("vmdr-verify-t", "vda"))
    with pytest.raises(HypervisorError, match="autostart"):
        sb.domain.set_autostart(True)
    sb.close()


def test_sandbox_is_transient_and_dies_with_the_connection(h: Harness) -> None:
    h.add_network("iso")
    sb = h.hv.start_sandbox(xml("vmdr-verify-a", "vda"), network="iso")
    assert sb.network is not None and sb.network.name == "iso"
    dom = sb.domain
    assert dom.is_active() and not dom.is_persistent()
    assert h.hv.lookup(dom.uuid).name == "vmdr-verify-a"
    with pytest.raises(HypervisorError):
        h.hv.create_transient(xml("vmdr-verify-a", "vda"))  # the name is taken
    sb.close()
    sb.close()  # gone already: no error
    with pytest.raises(DomainNotFound):
        h.hv.lookup("vmdr-verify-a")
    with h.hv.start_sandbox(xml("vmdr-verify-b", "vda")) as sb2:
        assert sb2.network is None and sb2.domain.is_active()
    assert "vmdr-verify-b" not in h.hv.list_domains()
    h.hv.start_sandbox(xml("vmdr-verify-c", "vda"))
    h.hv.close()  # vmdr killed: the connection goes, so does the sandbox
    assert "vmdr-verify-c" not in h.reconnect().list_domains()


def test_backup_side_is_optional(h: Harness) -> None:
    """The fake driver models no backups; it says so with HypervisorUnsupported."""
    h.add(xml("vm", "vda"))
    info = h.hv.domain("vm")
    if isinstance(h, FakeHarness):
        with pytest.raises(HypervisorUnsupported, match="not supported by the FakeHypervisor"):
            h.hv.backup(info, checkpoint_prefix="vmdr-1", scratch_dir="/tmp/x")
        with pytest.raises(HypervisorUnsupported):
            h.hv.list_checkpoints(info, "vmdr-1")
    else:
        assert h.hv.list_checkpoints(info, "vmdr-1") == []
    assert h.hv.read_nvram(info) is None


def test_libvirt_block_copy_is_a_full_transient_job() -> None:
    """libvirt 9 refuses block copy on a persistent domain without TRANSIENT_JOB; no
    SHALLOW flag: the NBD backing is flattened into the copy."""
    fl.install()
    try:
        fl.add_domain(xml("vm", "vda"), sizes={"vda": 1 << 20})
        connect().lookup("vm").block_copy("vda", "/images/vm-vda.qcow2", bandwidth=5 << 20)
        [(disk, dest, params, flags)] = fl.calls("blockCopy")
        assert disk == "vda" and "/images/vm-vda.qcow2" in dest and "type=\"qcow2\"" in dest
        assert flags == fl.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        assert params == {fl.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: 5 << 20}
    finally:
        fl.uninstall()
