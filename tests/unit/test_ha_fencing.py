"""Self-fencing timing, the watchdog device (a regular file stands in for /dev/watchdog;
never run on a hardware watchdog), fence_command, and the agent's guard over FakeFleet."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmdr.agent.ha_runtime import HARuntime, LibvirtOps
from vmdr.ha import qemukill
from vmdr.ha.fencing import SelfFence, Watchdog, run_fence_command
from vmdr.ha.model import HAVM, HAPolicy
from vmdr.ha.settings import ETCD_EXPIRY_GRANULARITY, FENCE_KILL_BUDGET, HASettings
from vmdr.ha.store import HAStore, MemoryKV
from vmdr.hypervisor.fake import FakeFleet


def test_fence_deadline_before_lease_expiry() -> None:
    s = HASettings()
    f = SelfFence(s, started=0.0)
    f.renewed(10.0)
    assert not f.due(10.0 + s.self_fence_after - 0.01)
    assert f.due(10.0 + s.self_fence_after)
    assert f.episode == 1 and f.due(20.0) and f.episode == 1  # one episode
    f.renewed(21.0)
    assert not f.due(21.5) and not f.fenced
    assert not f.due(22.0) and f.due(30.0) and f.episode == 2
    f.renewed(5.0)  # an older renewal (out of order) never moves the deadline back
    assert f.deadline == 21.0 + s.self_fence_after


def test_never_two_copies_under_random_renewal_loss() -> None:
    """Simulated timelines: renewals every lease_renew with random loss and delay. The host
    has destroyed its VMs (fence + kill budget) before the leader may restart them
    (expiry + fence delay), whatever happens."""
    s = HASettings()
    rng = random.Random(7)
    for _ in range(2000):
        t, last_sent, expiry = 0.0, 0.0, s.lease_ttl
        fence = SelfFence(s, 0.0)
        fence.renewed(0.0)
        cut = rng.uniform(0, 30)  # the partition starts
        while t < cut:
            t += s.lease_renew * rng.uniform(0.5, 1.0)
            if rng.random() < 0.2:
                continue  # lost renewal
            sent, handled = t, t + rng.uniform(0, 0.8)  # etcd handles it a bit later
            if handled < expiry:  # a renewal after expiry does not resurrect the lease
                last_sent, expiry = sent, handled + s.lease_ttl
                fence.renewed(sent)
        if handled >= expiry and t < cut:
            continue
        fenced_done = fence.deadline + FENCE_KILL_BUDGET
        detected = expiry + rng.uniform(0, ETCD_EXPIRY_GRANULARITY)
        assert fenced_done <= detected + s.fence_delay, (last_sent, expiry)
        assert fence.deadline < expiry


def test_watchdog_on_a_fake_device(tmp_path: Path) -> None:
    dev = tmp_path / "watchdog"
    dev.write_bytes(b"")
    assert Watchdog.available(str(dev)) and not Watchdog.available(str(tmp_path / "none"))
    w = Watchdog(str(dev), 3.5)
    assert w.timeout == 3  # whole seconds, rounded down: fires before the lease expires
    w.arm()
    w.pet()
    w.pet()
    w.disarm()
    assert dev.read_bytes() == b"\0\0\0V"  # pets, then the magic close
    dev2 = tmp_path / "watchdog2"
    dev2.write_bytes(b"")
    w2 = Watchdog(str(dev2), 5)
    w2.arm()
    w2.abandon()  # fenced without the magic close: the board would reset the host
    assert dev2.read_bytes() == b"\0" and w2.fd is None


def test_fence_command(tmp_path: Path) -> None:
    log = tmp_path / "fenced"
    script = tmp_path / "fence_test"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho Success: Powered OFF\n")
    script.chmod(0o755)
    r = run_fence_command(f"{script} --ip=bmc-{{host}} --action=off", "h2")
    assert r.ok and "Powered OFF" in r.output
    assert log.read_text() == "--ip=bmc-h2 --action=off\n"
    bad = run_fence_command(f"{tmp_path}/missing --action=off", "h2")
    assert not bad.ok
    script.write_text("#!/bin/sh\necho Failed: Unable to connect >&2\nexit 1\n")
    r = run_fence_command(str(script), "h3")
    assert not r.ok and "Unable to connect" in r.output


class _Coord:
    def __init__(self) -> None:
        self.last_renew_sent: float | None = None
        self.ever_seen: set[str] = set()

    def holds_lease(self, after: float) -> bool:
        return self.last_renew_sent is not None


def test_guard_destroys_only_ha_vms_and_reports_later(tmp_path: Path) -> None:
    fleet = FakeFleet()
    host = fleet.host("fake://h1/system")
    for vm in ("db", "scratch"):
        host.add_domain(f"<domain><name>{vm}</name><memory>1024</memory></domain>",
                        active=True)
    policy = HAPolicy(HASettings(), {"db": HAVM("db", 1)}, {"h1": None})
    store = HAStore(MemoryKV(), "/vmdr/", me="h1")
    store.put_domain("db", "<domain/>", "h1")
    coord = _Coord()
    dev = tmp_path / "wd"
    dev.write_bytes(b"")
    rt = HARuntime("h1", policy, coord, store,  # type: ignore[arg-type]
                   LibvirtOps({"h1": "fake://h1/system"}, fleet.connect), clock=lambda: 50.0,
                   watchdog=str(dev))
    rt.fence = SelfFence(policy.settings, 0.0)  # monotonic times of this test
    coord.last_renew_sent = 100.0
    assert rt.guard(101.0) == []
    assert rt.watchdog is not None and rt.watchdog.fd is not None  # armed with the lease
    assert rt.guard(100.0 + policy.settings.self_fence_after) == ["db"]
    assert not host.domains["db"].active and host.domains["scratch"].active
    rt.engine(50.0)  # fenced, not renewed: no publishing, no leading
    assert store.events() == []
    coord.last_renew_sent = 104.0  # etcd answers again
    rt.guard(104.1)
    rt.engine(60.0)
    kinds = [e.kind for e in store.events()]
    assert kinds == ["self-fenced", "detected"]
    rec = store.failover("h1")
    assert rec is not None and rec["self_reported"]
    rt.stop()
    assert dev.read_bytes().endswith(b"V")


def test_watchdog_armed_only_while_ha_vms_run(tmp_path: Path) -> None:
    fleet = FakeFleet()
    host = fleet.host("fake://h1/system")
    host.add_domain("<domain><name>db</name><memory>1024</memory></domain>")
    policy = HAPolicy(HASettings(), {"db": HAVM("db", 1)}, {"h1": None})
    coord = _Coord()
    dev = tmp_path / "wd"
    dev.write_bytes(b"")
    rt = HARuntime("h1", policy, coord, HAStore(MemoryKV()),  # type: ignore[arg-type]
                   LibvirtOps({"h1": "fake://h1/system"}, fleet.connect), watchdog=str(dev))
    rt.fence = SelfFence(policy.settings, 0.0)
    coord.last_renew_sent = 1.0
    rt.guard(1.1)
    assert rt.watchdog is not None and rt.watchdog.fd is None  # no HA VM here: not armed
    host.domains["db"].state = "running"
    coord.last_renew_sent = 2.0
    rt.guard(2.1)
    assert rt.watchdog.fd is not None  # armed with an HA VM running
    coord.last_renew_sent = 3.0
    rt.guard(3.1)
    host.domains["db"].state = "stopped"
    coord.last_renew_sent = 4.0
    rt.guard(4.1)
    assert rt.watchdog.fd is None and dev.read_bytes() == b"\0\0V"  # arm, pet, disarm


class _LeaderCoord(_Coord):
    def read_members(self) -> list[object]:
        return []


def test_dead_local_libvirtd_is_no_host_failure() -> None:
    """libvirtd alone dies (its QEMUs run on; the lease is renewed): one ``detected``
    event, no self-fencing, the leader's step goes on; once libvirtd is back, one more
    event and the XML is published again on a fresh connection."""
    fleet = FakeFleet()
    host = fleet.host("fake://h1/system")
    host.add_domain("<domain><name>db</name><memory>1024</memory></domain>", active=True)
    policy = HAPolicy(HASettings(), {"db": HAVM("db", 1)}, {"h1": None})
    store = HAStore(MemoryKV(), "/vmdr/", me="h1")
    coord = _LeaderCoord()
    rt = HARuntime("h1", policy, coord, store,  # type: ignore[arg-type]
                   LibvirtOps({"h1": "fake://h1/system"}, fleet.connect), watchdog=None)
    rt.fence = SelfFence(policy.settings, 0.0)
    rt.is_leader = lambda: True
    steps: list[float] = []
    rt.leader.step = lambda now, live, ever_seen: steps.append(now)  # type: ignore[method-assign]
    coord.last_renew_sent = 1.0
    rt.engine(10.0)
    assert store.where("db") == "h1"
    host.up = False  # libvirtd killed: the cached connection fails, connects are refused
    for i, t in enumerate((13.0, 15.5, 18.0)):
        coord.last_renew_sent = 2.0 + i  # the lease is renewed meanwhile
        assert rt.guard(2.1 + i) == []
        rt.engine(t)
    assert host.domains["db"].active and not rt.fence.fenced
    assert steps == [10.0, 13.0, 15.5, 18.0]  # the leader kept leading
    ev = store.events()
    assert [(e.kind, e.detail.get("libvirt")) for e in ev] == [("detected", "unreachable")]
    assert "unreachable" in ev[0].reason and ev[0].host == "h1"
    host.up = True
    rt._published.clear()
    rt.engine(20.5)
    ev = store.events()
    assert [(e.kind, e.detail.get("libvirt")) for e in ev][1:] == [("detected", "reachable")]
    assert ev[1].detail["down_s"] == 7.5 and store.where("db") == "h1"


def _fake_qemu(vm: str) -> subprocess.Popen[bytes]:
    """A process whose command line carries libvirt's ``-name guest=VM,...``."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name",
                          f"guest={vm},debug-threads=on"])
    for _ in range(200):  # the kernel fills /proc/PID/cmdline a moment after exec
        if b"guest=" in Path(f"/proc/{p.pid}/cmdline").read_bytes():
            break
        time.sleep(0.01)
    return p


def test_kill_by_pidfile_kills_only_the_named_guest(tmp_path: Path) -> None:
    db, other = _fake_qemu("db"), _fake_qemu("dbx")
    try:
        (tmp_path / "db.pid").write_text(f"{db.pid}\n")
        (tmp_path / "web.pid").write_text(f"{other.pid}\n")  # a stale file, pid reused
        (tmp_path / "gone.pid").write_text("999999999\n")
        (tmp_path / "bad.pid").write_text("not a pid\n")
        assert qemukill.qemu_pid("web", str(tmp_path)) is None  # "guest=dbx" is not web
        assert qemukill.kill_by_pidfile(["db", "web", "gone", "bad", "none"],
                                        str(tmp_path)) == ["db"]
        assert db.wait(5) == -signal.SIGKILL and other.poll() is None
    finally:
        for p in (db, other):
            p.kill()
            p.wait()


def test_guard_kills_qemu_by_pidfile_when_libvirt_is_dead_too(tmp_path: Path) -> None:
    """libvirtd dead and the lease lost: self-fencing cannot use libvirt, the QEMU must
    still die before the leader restarts the VM elsewhere."""
    fleet = FakeFleet()
    host = fleet.host("fake://h1/system")
    host.add_domain("<domain><name>db</name><memory>1024</memory></domain>", active=True)
    policy = HAPolicy(HASettings(), {"db": HAVM("db", 1)}, {"h1": None})
    store = HAStore(MemoryKV(), "/vmdr/", me="h1")
    coord = _Coord()
    rt = HARuntime("h1", policy, coord, store,  # type: ignore[arg-type]
                   LibvirtOps({"h1": "fake://h1/system"}, fleet.connect), clock=lambda: 50.0,
                   watchdog=None)
    assert rt.qemu_run_dir == ""  # not qemu:///system: no pid files of ours to read
    rt.qemu_run_dir = str(tmp_path)
    rt.fence = SelfFence(policy.settings, 0.0)
    coord.last_renew_sent = 100.0
    qemu = _fake_qemu("db")
    try:
        (tmp_path / "db.pid").write_text(f"{qemu.pid}\n")
        host.up = False  # libvirtd is gone as well
        assert rt.guard(100.0 + policy.settings.self_fence_after) == ["db"]
        assert qemu.wait(5) == -signal.SIGKILL
    finally:
        qemu.kill()
        qemu.wait()
