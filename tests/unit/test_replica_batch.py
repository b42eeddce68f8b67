"""A replica cycle's remote steps are batched: at most three commands at the DR site per
cycle whatever the number of disks (begin, serve, commit), none for an idle disk; and the
three scripts themselves, run for real against a local directory (``sh``, ``qemu-img``,
``qemu-nbd``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest

from tests.unit.test_replica import BLOCK, SIZE, _env, _state
from vmdr.errors import HypervisorError
from vmdr.jobs import replicate as rep
from vmdr.jobs.replica_scripts import commit_args, parse_begin, parse_begin_pins, serve_args
from vmdr.jobs.replicate_site import Site


@pytest.fixture(autouse=True)
def _locks(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_LOCK_DIR", str(tmp_path / "locks"))


def test_a_cycle_is_three_commands_and_an_idle_one_two() -> None:
    src, target, site, spec = _env()
    src.write(0, b"\x01" * BLOCK)
    rep.replicate_direct(src, target, site, spec)
    assert site.calls == ["begin", "serve", "commit"]
    site.calls.clear()
    idle = rep.replicate_direct(src, target, site, spec)
    assert site.calls == ["begin", "commit"] and idle.bytes_moved == 0  # nothing served
    site.calls.clear()
    src.write(7 * BLOCK, b"\x07" * 10)
    inc = rep.replicate_direct(src, target, site, spec)
    assert site.calls == ["begin", "serve", "commit"] and inc.bytes_moved == BLOCK
    assert site.images["/dr/web/web-replica-vda.qcow2"] == src.disk


def test_a_failed_commit_keeps_the_previous_point_and_checkpoint() -> None:
    src, target, site, spec = _env()
    first = rep.replicate_direct(src, target, site, spec)
    before = _state(site)
    site.fail_commit = True
    with pytest.raises(HypervisorError, match="snapshot failed"):
        rep.replicate_direct(src, target, site, spec)
    st = _state(site)
    assert [p.name for p in st.points] == [first.point] and st.cycles[-1].error
    assert st.checkpoint == before.checkpoint and st.checkpoint in src.cps
    site.fail_commit = False
    src.write(3 * BLOCK, b"\x03")
    again = rep.replicate_direct(src, target, site, spec)
    assert again.mode == "incremental" and again.bytes_moved == BLOCK  # since the old one
    assert site.images["/dr/web/web-replica-vda.qcow2"] == src.disk


def test_pure_argument_builders() -> None:
    args, data = commit_args([("/d/a", b"xy"), ("/d/s", b"{}")], "rp-1", ["/d/1", "/d/2"],
                             ["rp-0"])
    assert args == ["rp-1", "2", "/d/1", "/d/2", "1", "rp-0", "/d/a", "2", "/d/s", "2"]
    assert data == b"xy{}"
    args, data = serve_args(("/d/s", b"abc"), "qcow2", [("/d/1", 10, True), ("/d/2", None,
                                                                              False)])
    assert args == ["0", "", "/d/s", "3", "qcow2", "/d/1", "10", "1", "/d/2", "-", "0"]
    assert data == b"abc"
    assert parse_begin(b"123\nnone\nfile 3\nab\nfile 0\n", 3) == (123, [None, b"ab\n", b""])
    with pytest.raises(ValueError):
        parse_begin(b"1\nfile 9\nab", 1)


needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-nbd")),
                                reason="qemu-img / qemu-nbd not installed")


def _count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    run, popen = subprocess.run, subprocess.Popen
    inside = []

    def counted_run(argv: Any, *a: Any, **kw: Any) -> Any:
        calls.append("run")
        inside.append(1)
        try:
            return run(argv, *a, **kw)
        finally:
            inside.pop()

    def counted_popen(argv: Any, *a: Any, **kw: Any) -> Any:
        if not inside:
            calls.append("popen")
        return popen(argv, *a, **kw)

    monkeypatch.setattr("vmdr.jobs.replicate_site.subprocess.run", counted_run)
    monkeypatch.setattr("vmdr.jobs.replicate_site.subprocess.Popen", counted_popen)
    return calls


@needs_qemu
def test_the_scripts_for_real_on_a_local_site(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "dr" / "web"
    site = Site("qemu:///system")
    calls = _count(monkeypatch)
    free, files = site.begin(str(d), ["replica.json", "x.chunks"])
    assert free > 0 and files == [None, None] and d.is_dir()
    a, b = str(d / "a.qcow2"), str(d / "b.qcow2")
    state = json.dumps({"writing": True}).encode()
    ex = site.serve((str(d / "replica.json"), state), [(a, SIZE, True), (b, SIZE, False)])
    try:
        assert list(ex.writers) == [a]  # b created, not served
        ex.writers[a].write(BLOCK, b"\x05" * BLOCK)
    finally:
        ex.close()
    assert (d / "replica.json").read_bytes() == state
    assert (d / "replica.json").stat().st_mode & 0o777 == 0o600
    assert Path(b).exists()
    site.commit([(str(d / "x.chunks"), b"\x00" * 64)], "rp-1", [a, b], [])
    site.commit([(str(d / "replica.json"), b"{}")], "rp-2", [a, b], ["rp-1", "rp-0"])
    assert calls == ["run", "popen", "run", "run"]  # one command per step, no forwards
    site.prefetch(str(d), ["replica.json"])  # e.g. while libvirt still logs in
    assert site.begin(str(d), ["replica.json"])[1] == [b"{}"] and len(calls) == 5
    assert site.begin(str(d), ["replica.json"])[1] == [b"{}"] and len(calls) == 6  # once
    free, files = site.begin(str(d), ["replica.json", "x.chunks"])
    assert files == [b"{}", b"\x00" * 64]
    for img in (a, b):
        out = subprocess.run(["qemu-img", "snapshot", "-l", "-U", img], check=True,
                             capture_output=True, text=True).stdout
        assert "rp-2" in out and "rp-1" not in out
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", a,
                          "/dev/null"], capture_output=True, text=True)
    assert cmp.returncode == 1  # a holds the written block
    with pytest.raises(HypervisorError, match=r"missing\.qcow2"):
        site.commit([(str(d / "replica.json"), b"NEW")], "rp-3",
                    [a, str(d / "missing.qcow2")], [])
    assert (d / "replica.json").read_bytes() == b"{}"  # no state for a point not taken


class _OfflineJob:
    """A stopped VM's read: the changes since the checkpoint (its qcow2 bitmaps), no new
    checkpoint (libvirt makes none offline)."""

    method, consistency, checkpoint, checkpoint_xml = "offline", "crash", None, None

    def __init__(self, disks: list[Any]) -> None:
        self.disks, self.committed = disks, False
        self.warnings: list[str] = []

    def commit(self) -> None:
        self.committed = True

    def __enter__(self) -> _OfflineJob:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_stopped_vm_is_read_from_its_last_checkpoint_not_in_full() -> None:
    """The planned failover's final cycle: the source is shut down; only what changed
    since the last cycle moves, and the next cycle reads from the same checkpoint."""
    from tests.unit.test_replica import _Reader
    from vmdr.hypervisor import DiskSource

    src, target, site, spec = _env()
    src.write(0, b"\x01" * 8 * BLOCK)
    rep.replicate_direct(src, target, site, spec)
    cp = _state(site).checkpoint
    src.write(40 * BLOCK, b"\x02" * BLOCK)  # written before the shutdown
    src.lookup("web").destroy()
    online_backup = src.backup
    offline: list[str] = []

    def offline_backup(info: Any, **kw: Any) -> Any:
        if info.running:
            return online_backup(info, **kw)
        inc = kw.get("incremental_from")
        offline.append(str(inc))
        assert inc == cp, "a stopped VM must still be read from the replica's checkpoint"
        d = next(x for x in info.disks if x.target == "vda")
        return _OfflineJob([DiskSource(d, True, _Reader(bytearray(src.disk),
                                                         set(src.cps[cast(str, inc)])))])

    src.backup = offline_backup  # type: ignore[method-assign]
    final = rep.replicate_direct(src, target, site, spec)
    assert offline == [cp] and final.mode == "incremental" and final.bytes_moved == BLOCK
    assert site.images["/dr/web/web-replica-vda.qcow2"] == src.disk
    assert _state(site).checkpoint == cp  # the next cycle reads from it again


def test_read_ahead_keeps_order_skips_holes_and_bounds_reads_in_flight() -> None:
    import threading
    import time

    started: list[int] = []
    sent: list[int] = []
    lock = threading.Lock()

    def read(off: int, ln: int) -> bytes:
        with lock:
            started.append(off)
            assert len(started) - len(sent) <= 3 + 1, "more than depth reads ahead"
        time.sleep(0.002)
        return bytes([off % 251]) * ln

    spans = [(i * 10, 10, i % 4 != 1) for i in range(40)]
    out = []
    for off, ln, data in rep.read_ahead(read, spans, depth=3):
        with lock:
            sent.append(off)
        out.append((off, ln, data))
    assert [o for o, _l, _d in out] == [s[0] for s in spans]
    assert all((d is None) == (not w) for (_o, _l, d), (_s, _n, w) in zip(out, spans,
                                                                          strict=True))
    assert all(d == bytes([o % 251]) * 10 for o, _l, d in out if d is not None)
    assert sorted(started) == [s[0] for s in spans if s[2]]
    assert list(rep.read_ahead(read, [])) == []


def test_compression_can_be_turned_off_for_the_data() -> None:
    uri = "qemu+ssh://root@dr1/system?keyfile=/k/id&known_hosts=/k/kh"
    on, off = Site(uri), Site(uri, compress=False)
    assert on._host is not None and off._host is not None
    assert on.stream and on.compress and not off.compress  # vmdr's zstd, on or off
    assert "Compression=yes" not in on._host.target.argv()  # ssh never compresses
    argv = off._host.target.argv()
    assert "Compression=yes" not in argv and "UserKnownHostsFile=/k/kh" in argv
    assert "BatchMode=yes" in argv  # keys only, host key checked as before


def test_begin_reads_the_pins_of_running_test_failovers_in_the_same_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A held ``test-*/pin`` names a point a test failover reads; a pin file whose lock
    is free (the test died) does not count; and the answer costs no extra command."""
    d = tmp_path / "dr" / "web"
    site = Site("qemu:///system")
    for run, point in (("test-a", "rp-1"), ("test-b", "rp-2")):
        (d / run).mkdir(parents=True)
        (d / run / "pin").write_text(point)
    holder = subprocess.Popen(["flock", "-s", str(d / "test-a" / "pin"), "sleep", "30"])
    try:
        for _ in range(100):  # until the shared lock is held
            if subprocess.run(["flock", "-n", "-x", str(d / "test-a" / "pin"), "true"]
                              ).returncode != 0:
                break
            time.sleep(0.05)
        calls = _count(monkeypatch)
        site.begin(str(d), ["replica.json"])
        assert site.pinned_points(str(d)) == {"rp-1"} and calls == ["run"]
        assert site.pinned_points(str(d)) == {"rp-1"} and calls == ["run", "run"]  # asked
    finally:
        holder.kill()
        holder.wait()
    free, _files, pins = parse_begin_pins(b"123\nfile 6\npin x\nnone\npin rp-9\n", 2)
    assert (free, pins) == (123, {"rp-9"})  # a file's bytes are not read as a pin
