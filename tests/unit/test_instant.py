"""Instant recovery without a hypervisor: XML helpers, the block-copy loop, validation and
the events it reports, against a small fake domain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from typing import Any

import pytest

from vmdr.errors import HypervisorError, ServeError, UsageError, VmdrError
from vmdr.events import BytesProgress, JobEvents, ListSink, PhaseStarted
from vmdr.hypervisor import Domain, mirror
from vmdr.hypervisor.fake import FakeDomain, FakeDomainRecord, FakeFleet
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


@pytest.fixture(autouse=True)
def copies_create_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like libvirt (without REUSE_EXT), a block copy creates its destination file at once;
    the fake driver only records it. Each status call then appends a few bytes to it."""
    block_copy = FakeDomain.block_copy

    def create(self: FakeDomain, disk: str, dest: str, **kw: Any) -> Any:
        job = block_copy(self, disk, dest, **kw)
        if os.path.isdir(os.path.dirname(dest)):
            with open(dest, "xb") as f:
                f.write(b"QFI\xfb")
        return job

    monkeypatch.setattr(FakeDomain, "block_copy", create)


class FakeServer:
    def __init__(self, alive: bool = True, rec: FakeDomainRecord | None = None) -> None:
        self._alive = alive
        self.stopped = False
        self._rec = rec  # its NBD clients connect once nbd_unread of their socket is 0
        # disk -> the socket the fake XML names; no waiting for clients without a record
        self.sockets = {d: f"/run/s/{d}.sock" for d in rec.sizes} if rec else {}

    def clients(self, disk: str) -> int:
        assert self._rec is not None
        return int(self._rec.nbd_unread.get(self.sockets[disk], 0) == 0)

    def alive(self) -> bool:
        return self._alive

    def stop(self) -> None:
        self.stopped = True


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
    hidden = mirror.disk_sources(dom.xml(inactive=True))
    for d in ("vda", "vdb"):  # running on the hidden copy, its final name a hard link to it
        assert os.path.basename(hidden[d]).startswith(f".{d}.qcow2.")
        assert hidden[d].endswith(instant.TEMP_SUFFIX)
        assert os.path.samefile(hidden[d], f"{tmp_path}/{d}.qcow2")
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
        monkeypatch.setattr("vmdr.jobs.instant.time.sleep", lambda s: None)
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
    assert not (tmp_path / "run" / "instant" / "web-now").exists()  # nor its socket dir
    xml = defined[0]  # what would have been defined: overlays, stop policy, new console log
    assert f"{target}/web-now-vda.overlay.qcow2" in xml and "rerror_policy=\"stop\"" in xml
    assert f"{target}/web-now-console.log" in xml and "<name>web-now</name>" in xml


def _moving(tmp_path: Any, size: int = 1000) -> tuple[Any, FakeDomainRecord, dict[str, Any]]:
    """A fake hypervisor with domain x on NBD, and the state a fresh run plans for it."""
    hv = FakeFleet.simulated(1).connect("fake://host01/system")
    rec = hv.host.add_domain(_xml(vda="nbd"), active=True, sizes={"vda": size})
    rec.copy_step = 100
    target = f"{tmp_path}/x-vda.qcow2"
    st = {"version": instant.STATE_VERSION, "vm": "x", "snapshot": "ab" * 32,
          "target_dir": str(tmp_path), "state_file": instant.state_file(str(tmp_path), "x"),
          "socket_dir": f"{tmp_path}/run",
          "disks": {"vda": {"target": target, "temp": instant.temp_name(target),
                            "overlay": f"{tmp_path}/x-vda.overlay.qcow2"}}}
    instant._write_state(st)
    return hv, rec, st


def test_final_name_appears_only_when_the_copy_is_complete(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14 item 5: while the copy runs only the hidden name exists; after the pivot the
    final name is the same file, and the state file names the hidden copy."""
    hv, rec, st = _moving(tmp_path)
    target, temp = st["disks"]["vda"]["target"], st["disks"]["vda"]["temp"]
    seen: list[tuple[bool, bool, int]] = []

    def poll(_: float) -> None:
        seen.append((os.path.exists(target), os.path.exists(temp), rec.copies["vda"].cur))

    monkeypatch.setattr("vmdr.jobs.instant.time.sleep", poll)
    instant._migrate(hv.lookup("x"), st, instant.InstantOptions(name="x", poll=0),
                     JobEvents(), FakeServer())
    assert len(seen) == 9 and seen[-1][2] == 900  # polled 9 times while copying
    assert all(not final and hidden for final, hidden, _ in seen)
    assert os.path.samefile(target, temp)
    assert mirror.disk_sources(hv.lookup("x").xml()) == {"vda": temp}  # QEMU keeps its path
    with open(st["state_file"], encoding="utf-8") as f:
        assert json.load(f)["disks"]["vda"]["temp"] == temp


def test_killed_copy_restarts_from_scratch_and_never_names_it(tmp_path: Any) -> None:
    """A run killed mid-copy left the hidden copy: --resume's copy deletes and redoes it;
    a file someone put at the final name meanwhile is refused, not overwritten."""
    hv, _rec, st = _moving(tmp_path)
    target, temp = st["disks"]["vda"]["target"], st["disks"]["vda"]["temp"]
    with open(temp, "wb") as f:
        f.write(b"stale partial copy")
    with open(target, "wb") as f:
        f.write(b"foreign")
    opts = instant.InstantOptions(name="x", poll=0)
    with pytest.raises(VmdrError, match="appeared while vda was still being copied"):
        instant._migrate(hv.lookup("x"), st, opts, JobEvents(), FakeServer())
    os.unlink(target)
    instant._migrate(hv.lookup("x"), st, opts, JobEvents(), FakeServer())
    with open(target, "rb") as f:
        assert f.read() == b"QFI\xfb"  # the new copy, not the stale one


def test_pivoted_but_unnamed_copy_is_named_by_resume(tmp_path: Any) -> None:
    """Killed between the pivot and the link: the next _migrate only links."""
    hv, rec, st = _moving(tmp_path)
    target, temp = st["disks"]["vda"]["target"], st["disks"]["vda"]["temp"]
    dom = hv.lookup("x")
    dom.block_copy("vda", temp)
    rec.copies["vda"].cur = rec.copies["vda"].end
    assert dom.block_job("vda").pivot() and not os.path.exists(target)
    instant._migrate(dom, st, instant.InstantOptions(name="x", poll=0), JobEvents(),
                     FakeServer())
    assert os.path.samefile(target, temp)


def test_finish_defines_final_names_and_resume_tidies_after_restart(tmp_path: Any) -> None:
    """The persistent domain boots from the final names; the hidden link and the state file
    stay while the running VM uses them, and --resume removes them after a cold start."""
    hv, _rec, st = _moving(tmp_path)
    target, temp = st["disks"]["vda"]["target"], st["disks"]["vda"]["temp"]
    opts = instant.InstantOptions(name="x", poll=0, target_dir=str(tmp_path))
    res = instant._run(st, opts, hv, JobEvents(), FakeServer(), 0.0, boot=False)
    dom = hv.lookup("x")
    assert res["hidden"] == [temp] and res["disks"] == {"vda": target}
    assert mirror.disk_sources(dom.xml()) == {"vda": temp}
    assert mirror.disk_sources(dom.xml(inactive=True)) == {"vda": target}
    with open(st["state_file"], encoding="utf-8") as f:
        assert json.load(f)["moved"] is True
    again = instant.instant_resume(Any, "x", opts, hv, JobEvents())  # type: ignore[arg-type]
    assert again["hidden"] == [temp] and os.path.exists(temp)  # still in use: kept
    dom.destroy()
    dom.start()  # a cold start: now on the final name
    with open(st["state_file"] + ".tmp", "w") as f:  # a state write a killed run left
        f.write("{")
    again = instant.instant_resume(Any, "x", opts, hv, JobEvents())  # type: ignore[arg-type]
    assert again["hidden"] == [] and not os.path.exists(temp)
    assert os.path.exists(target) and not os.path.exists(st["state_file"])
    assert sorted(os.listdir(tmp_path)) == ["x-vda.qcow2"]  # nothing else of the run


def test_await_nbd_reads_until_the_client_reconnected(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a kill -9 QEMU's NBD clients fail requests until they reconnected: _await_nbd
    reads through each (moving its reconnect on) until the server sees it connected, then
    once more (the read that takes the new connection)."""
    rec, dom = _dom({"vda": 1000, "vdb": 1000})
    rec.nbd_unread = {"/run/s/vda.sock": 3}
    naps: list[float] = []
    monkeypatch.setattr("vmdr.jobs.instant.time.sleep", naps.append)
    instant._await_nbd(dom, FakeServer(rec=rec), ["vda", "vdb"])
    assert rec.nbd_unread == {"/run/s/vda.sock": 0}
    assert rec.nbd_reads == 5 and len(naps) == 3  # vdb once; vda 3 failures + 1 success


@pytest.mark.parametrize("case", ["never", "server-dead"])
def test_await_nbd_gives_up(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    rec, dom = _dom({"vda": 1000})
    rec.nbd_unread = {"/run/s/vda.sock": -1}  # the repository stays unreachable
    monkeypatch.setattr("vmdr.jobs.instant.time.sleep", lambda s: None)
    server = FakeServer(alive=case != "server-dead", rec=rec)
    with pytest.raises(VmdrError, match="NBD server stopped" if case == "server-dead"
                       else "client of vda did not reconnect to the export within 0s"):
        instant._await_nbd(dom, server, ["vda"], timeout=0)


def test_failed_copy_restarts_only_once_qemu_reads_the_disk_again(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that failed (its first read hit a reconnecting client) is restarted after a
    read through the NBD client succeeded, not after a fixed sleep."""
    rec, dom = _dom({"vda": 300})
    rec.failing_copies.add("vda")
    rec.nbd_unread = {"/run/s/vda.sock": 2}
    reads_at_start: list[int] = []
    block_copy = FakeDomain.block_copy

    def copy(self: FakeDomain, disk: str, dest: str, **kw: Any) -> Any:
        reads_at_start.append(rec.nbd_reads)
        if len(reads_at_start) == 2:
            rec.failing_copies.discard("vda")  # the client is back: the copy works
        return block_copy(self, disk, dest, **kw)

    monkeypatch.setattr(FakeDomain, "block_copy", copy)
    monkeypatch.setattr("vmdr.jobs.instant.time.sleep", lambda s: None)
    instant._migrate(dom, _state(str(tmp_path), ["vda"]),
                     instant.InstantOptions(name="x", poll=0), JobEvents(),
                     FakeServer(rec=rec))
    assert reads_at_start == [0, 3]  # restarted after 2 failed reads and 1 that worked
    assert mirror.nbd_backed_disks(dom.xml()) == []


def _fake_nbdkit(tmp_path: Any, sock: str, owner: int,
                 start: str | None = None) -> subprocess.Popen[bytes]:
    """A process whose command line is that of vmdr's nbdkit serving *sock*, started by
    the vmdr *owner* (its private directory's owner.json; ``start``: its start time)."""
    from vmdr.serve import server as srv

    private = tmp_path / f"vmdr-serve-{owner}"
    private.mkdir(exist_ok=True)
    record: dict[str, Any] = {"pid": owner}
    if start is not None:
        record["start"] = start
    (private / srv.OWNER_FILE).write_text(json.dumps(record))
    return subprocess.Popen([
        "bash", "-c", 'exec -a /usr/sbin/nbdkit "$0" -c "import time; time.sleep(60)" "$@"',
        os.path.realpath(sys.executable), "-r", "--pidfile", str(private / "vda.pid"), "-f",
        "-U", sock, "python", srv.PLUGIN, "setup=x"])


def test_reap_orphans_kills_the_dead_runs_nbdkit_on_our_socket(tmp_path: Any) -> None:
    """The killed run's nbdkit still serving the socket is SIGKILLed (a quitting nbdkit
    would keep answering ESHUTDOWN); one on another socket, or whose vmdr lives, is not."""
    from vmdr.serve import server as srv

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    sock, other = str(tmp_path / "vda.sock"), str(tmp_path / "vdb.sock")
    orphan = _fake_nbdkit(tmp_path, sock, dead.pid)
    bystander = _fake_nbdkit(tmp_path, other, dead.pid + 100_000)
    try:
        deadline = time.monotonic() + 10
        while not srv.is_nbdkit(orphan.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.reap_orphans([sock]) == [orphan.pid]
        assert orphan.wait(5) == -signal.SIGKILL and bystander.poll() is None
        # the dead run's private directory (pid files, logs) went with its nbdkit
        assert not (tmp_path / f"vmdr-serve-{dead.pid}").exists()
        assert (tmp_path / f"vmdr-serve-{dead.pid + 100_000}").is_dir()
        busy = _fake_nbdkit(tmp_path, sock, live.pid)
        try:
            while not srv.is_nbdkit(busy.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(ServeError, match=f"being served by vmdr \\(pid {live.pid}\\)"):
                srv.reap_orphans([sock])
            assert busy.poll() is None
        finally:
            busy.kill()
            busy.wait()
    finally:
        for p in (bystander, live):
            p.kill()
            p.wait()


def test_reap_orphans_takes_a_reused_owner_pid_for_dead(tmp_path: Any) -> None:
    """The killed vmdr's pid now belongs to another process (its start time differs): the
    orphan is still reaped, not refused as 'being served by vmdr'."""
    from vmdr.procutil import proc_start_time
    from vmdr.serve import server as srv

    reused = subprocess.Popen(["sleep", "60"])  # took the dead vmdr's pid
    sock = str(tmp_path / "vda.sock")
    start = proc_start_time(reused.pid)
    assert start is not None
    orphan = _fake_nbdkit(tmp_path, sock, reused.pid, start=str(int(start) - 1))
    try:
        deadline = time.monotonic() + 10
        while not srv.is_nbdkit(orphan.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.reap_orphans([sock]) == [orphan.pid]
        assert orphan.wait(5) == -signal.SIGKILL
        assert reused.poll() is None  # the process that reused the pid is untouched
        assert not (tmp_path / f"vmdr-serve-{reused.pid}").exists()
        # the same record with the right start time: that vmdr runs, hands off
        orphan = _fake_nbdkit(tmp_path, sock, reused.pid, start=start)
        while not srv.is_nbdkit(orphan.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ServeError, match="being served by vmdr"):
            srv.reap_orphans([sock])
        assert orphan.poll() is None
    finally:
        for p in (orphan, reused):
            p.kill()
            p.wait()


@pytest.mark.parametrize("pidfd", [True, False])
def test_a_pinned_process_is_never_confused_with_a_reused_pid(
        pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal for a pinned process that has gone never reaches another process, by pidfd
    or (kernels without one) by the start time checked before the kill."""
    import os as _os

    from vmdr.procutil import Pinned

    if not pidfd:
        monkeypatch.delattr(_os, "pidfd_open")
    gone = subprocess.Popen(["sleep", "60"])
    pin = Pinned(gone.pid)
    assert (pin.fd is not None) == pidfd and pin.alive()
    gone.kill()
    gone.wait()
    assert not pin.alive() and pin.signal(signal.SIGKILL) is False
    pin.close()
    # without a pidfd: the pid now names another process (a different start time)
    other = subprocess.Popen(["sleep", "60"])
    try:
        pin = Pinned(other.pid)
        if not pidfd:
            pin.start = "1"  # as if pinned before the pid was reused
            assert not pin.alive() and pin.signal(signal.SIGKILL) is False
            assert other.poll() is None
        else:
            assert pin.alive() and pin.signal(signal.SIGTERM) is True
            assert other.wait(5) == -signal.SIGTERM
        pin.close()
    finally:
        other.kill()
        other.wait()


def test_resume_after_kill_waits_for_nbd_before_resuming_and_copying(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume after a kill -9 (VM paused on an I/O error, its NBD client still on the
    dead server): the VM is resumed and the copy started only once the client is back,
    and one run finishes the move."""
    hv, rec, st = _moving(tmp_path)
    rec.pause_on_io_error()
    rec.nbd_unread = {"/run/s/vda.sock": 2}
    seen: dict[str, int] = {}
    resume, block_copy = FakeDomain.resume_after_io_error, FakeDomain.block_copy

    def resumed(self: FakeDomain, **kw: Any) -> None:
        seen["resume"] = rec.nbd_unread["/run/s/vda.sock"]
        resume(self, **kw)

    def copying(self: FakeDomain, disk: str, dest: str, **kw: Any) -> Any:
        seen["copy"] = rec.nbd_unread["/run/s/vda.sock"]
        return block_copy(self, disk, dest, **kw)

    monkeypatch.setattr(FakeDomain, "resume_after_io_error", resumed)
    monkeypatch.setattr(FakeDomain, "block_copy", copying)
    monkeypatch.setattr("vmdr.jobs.instant.time.sleep", lambda s: None)
    def serve(repo: Any, snap: Any, st: dict[str, Any], hv: Any) -> FakeServer:
        st["disks"]["vda"]["uri"] = "nbd+unix:///vda?socket=/run/s/vda.sock"
        return FakeServer(rec=rec)

    monkeypatch.setattr(instant, "_serve", serve)
    repo = types.SimpleNamespace(load_snapshot=lambda sid: None)
    opts = instant.InstantOptions(name="x", poll=0, target_dir=str(tmp_path))
    res = instant.instant_resume(repo, "x", opts, hv, JobEvents())  # type: ignore[arg-type]
    assert seen == {"resume": 0, "copy": 0} and rec.nbd_reads == 3
    assert res["disks"] == {"vda": st["disks"]["vda"]["target"]}
    assert hv.lookup("x").state() == "running"
