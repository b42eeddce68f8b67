"""Backup session flows against the fake libvirt (NBD readers stubbed)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import HypervisorError, UsageError
from vmdr.hypervisor import backup as backup_mod
from vmdr.hypervisor import connect
from vmdr.hypervisor import state as st
from vmdr.hypervisor.nbd import BASE_ALLOCATION, Extent

P = "vmdr-1a2b3c4d"
T0 = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 1, 2, 0, 0, 0, tzinfo=UTC)


class StubReader:
    def __init__(self, ctx: str) -> None:
        self.ctx, self.size, self.closed = ctx, 1 << 20, False

    def extents(self) -> Iterator[Extent]:
        yield Extent(0, self.size, True)

    def read(self, offset: int, length: int) -> bytes:
        return b"\0" * length

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    fl.install()
    monkeypatch.setattr(st, "qemu_user", lambda: None)  # no chown of pytest's tmp dirs
    readers: list[StubReader] = []

    def unix_export(sock: str, export: str, ctx: str) -> StubReader:
        readers.append(StubReader(ctx))
        return readers[-1]

    monkeypatch.setattr(backup_mod, "unix_export", unix_export)
    def image_reader(d: Any, lock: bool = False) -> StubReader:
        readers.append(StubReader("file"))
        return readers[-1]

    monkeypatch.setattr(backup_mod, "_image_reader", image_reader)
    disks = (fl.disk_xml("vda", "/img/a.qcow2") + fl.disk_xml("vdb", "/img/b.raw", fmt="raw")
             + fl.disk_xml("sda", None, fmt="raw", device="cdrom"))
    dom = fl.add_domain(fl.domain_xml("web", disks), sizes={"vda": 1 << 30, "vdb": 1 << 20})
    yield {"dom": dom, "hv": connect(), "scratch": str(tmp_path / "scratch"), "readers": readers}
    fl.uninstall()


def _backup(env: dict[str, Any], **kw: Any) -> Any:
    hv = env["hv"]
    kw.setdefault("now", T0)
    return hv.backup(hv.domain("web"), checkpoint_prefix=P, scratch_dir=env["scratch"], **kw)


def test_full_then_incremental(env: dict[str, Any]) -> None:
    dom = env["dom"]
    with _backup(env) as s:
        assert s.method == "checkpoint" and s.consistency == "crash"
        assert s.checkpoint == f"{P}-20260101T000000.000Z"
        assert s.checkpoint_xml and "<domain" in s.checkpoint_xml
        assert [d.info.target for d in s.disks] == ["vda", "vdb"]
        assert not any(d.incremental for d in s.disks)
        assert [d.target for d in s.skipped] == ["sda"]
        assert any("sda skipped: cdrom" in w for w in s.warnings)
        assert os.path.exists(os.path.join(s.workdir, "state.json"))
        s.commit()
    assert dom.job is None and list(dom.checkpoints) == [f"{P}-20260101T000000.000Z"]
    bx = ET.fromstring(fl.calls("backupBegin")[-1][0])
    modes = {d.get("name"): d.get("backupmode") for d in bx.iter("disk")}
    assert modes == {"vda": "full", "vdb": "full"}  # cdrom has no source: not listed
    cp = ET.fromstring(fl.calls("backupBegin")[-1][1])
    assert {d.get("name"): d.get("checkpoint") for d in cp.iter("disk")} == \
        {"vda": "bitmap", "vdb": "no", "sda": "no"}

    with _backup(env, incremental_from=f"{P}-20260101T000000.000Z", now=T1) as s:
        inc = {d.info.target: d.incremental for d in s.disks}
        assert inc == {"vda": True, "vdb": False}
        assert s.disks[0].reader.ctx == "qemu:dirty-bitmap:backup-vda"
        assert s.disks[1].reader.ctx == BASE_ALLOCATION
        s.commit()
    assert list(dom.checkpoints) == [f"{P}-20260102T000000.000Z"]  # older one of prefix deleted
    bx = ET.fromstring(fl.calls("backupBegin")[-1][0])
    vda = next(d for d in bx.iter("disk") if d.get("name") == "vda")
    assert vda.get("backupmode") == "incremental"
    assert vda.get("incremental") == f"{P}-20260101T000000.000Z"
    assert all(r.closed for r in env["readers"])
    assert not os.path.exists(st.workdir_for(env["scratch"], dom.UUIDString()))


def test_no_commit_deletes_new_checkpoint_and_aborts(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.checkpointCreateXML(
        f"<domaincheckpoint><name>{P}-20251231T000000.000Z</name></domaincheckpoint>", 0)
    dom.checkpointCreateXML("<domaincheckpoint><name>other</name></domaincheckpoint>", 0)
    with pytest.raises(RuntimeError), _backup(env) as s:
        assert dom.job is not None
        raise RuntimeError("repository write failed")
    assert s.checkpoint is None and dom.job is None
    assert sorted(dom.checkpoints) == sorted([f"{P}-20251231T000000.000Z", "other"])
    assert fl.calls("abortJob")


def test_broken_bitmap_gives_full(env: dict[str, Any]) -> None:
    dom = env["dom"]
    with _backup(env) as s:
        s.commit()
    dom.broken_bitmaps.add((f"{P}-20260101T000000.000Z", "vda"))
    with _backup(env, incremental_from=f"{P}-20260101T000000.000Z", now=T1) as s:
        assert not s.disks[0].incremental
        assert "missing or broken" in (s.disks[0].full_reason or "")
        assert any("vda: full backup" in w for w in s.warnings)


def test_missing_checkpoint_gives_full(env: dict[str, Any]) -> None:
    with _backup(env, incremental_from=f"{P}-20250101T000000.000Z") as s:
        assert not any(d.incremental for d in s.disks)
        assert "missing in libvirt" in (s.disks[0].full_reason or "")


def test_libvirt_rejecting_incremental_retries_full(env: dict[str, Any]) -> None:
    dom = env["dom"]
    with _backup(env) as s:
        s.commit()
    dom.fail_backup.append(fl.libvirtError("missing bitmap", fl.VIR_ERR_CHECKPOINT_INCONSISTENT))
    with _backup(env, incremental_from=f"{P}-20260101T000000.000Z", now=T1) as s:
        assert not any(d.incremental for d in s.disks)
        assert any("rejected the incremental" in w for w in s.warnings)
    assert len(fl.calls("backupBegin")) == 3


def test_quiesce_with_agent_freezes_and_thaws(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.agent = lambda cmd: 2 if cmd["execute"] == "guest-fsfreeze-freeze" else {}
    with _backup(env, quiesce=True) as s:
        assert s.consistency == "quiesced"
    order = [n for n, _ in fl.CALLS if n in ("qemuAgentCommand", "backupBegin", "fsThaw")]
    assert order == ["qemuAgentCommand", "qemuAgentCommand", "backupBegin", "fsThaw"]


def test_thaw_even_when_backup_begin_fails(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.agent = lambda cmd: 1
    dom.fail_backup.append(fl.libvirtError("QEMU died", fl.VIR_ERR_INTERNAL_ERROR))
    with pytest.raises(HypervisorError, match="QEMU died"), _backup(env, quiesce=True):
        pass
    assert fl.calls("fsThaw")
    assert not dom.checkpoints and dom.job is None


def test_quiesce_without_agent_is_crash_consistent(env: dict[str, Any]) -> None:
    with _backup(env, quiesce=True) as s:
        assert s.consistency == "crash"
        assert any("guest agent not answering" in w for w in s.warnings)
    assert not fl.calls("fsThaw")


def test_unknown_disk_is_usage_error(env: dict[str, Any]) -> None:
    with pytest.raises(UsageError), _backup(env, disks=["vdz"]):
        pass


def test_only_selected_disks(env: dict[str, Any]) -> None:
    with _backup(env, disks=["vdb"]) as s:
        assert [d.info.target for d in s.disks] == ["vdb"]
        assert s.checkpoint is None  # a raw disk alone carries no bitmap


def test_overlay_method(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.agent = lambda cmd: {}
    with _backup(env, method="overlay", quiesce=True) as s:
        assert s.method == "overlay" and s.checkpoint is None and s.consistency == "quiesced"
        assert "vmdr-overlay.qcow2" in dom.XMLDesc(0)
        _xml, flags = fl.calls("snapshotCreateXML")[-1]
        assert flags & fl.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        assert flags & fl.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        assert flags & fl.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    assert "vmdr-overlay" not in dom.XMLDesc(0)
    assert "/img/a.qcow2" in dom.XMLDesc(0)
    commits = fl.calls("blockCommit")
    assert {c[0] for c in commits} == {"vda", "vdb"}
    assert all(c[1] == fl.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | fl.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
               for c in commits)
    assert all(a[1] == fl.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT for a in fl.calls("blockJobAbort"))


def test_auto_falls_back_to_overlay_when_unsupported(env: dict[str, Any]) -> None:
    env["dom"].fail_backup.append(fl.libvirtError("no backup", fl.VIR_ERR_NO_SUPPORT))
    with _backup(env) as s:
        assert s.method == "overlay"
        assert any("using overlays" in w for w in s.warnings)


def test_offline_for_stopped_domain(env: dict[str, Any]) -> None:
    fl.reset()
    net = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           "<source protocol='rbd' name='p/i'/><target dev='vdn' bus='virtio'/></disk>")
    fl.add_domain(fl.domain_xml("web", fl.disk_xml("vda", "/img/a.qcow2") + net), active=False)
    env["hv"] = connect()
    with _backup(env) as s:
        assert s.method == "offline" and s.checkpoint is None
        assert [d.info.target for d in s.disks] == ["vda"]
        assert [(d.target, d.skip_reason) for d in s.skipped] == \
            [("vdn", "type='network' cannot be read while the domain is stopped")]
    assert not fl.calls("backupBegin")
    with pytest.raises(HypervisorError, match="not running"), _backup(env, method="checkpoint"):
        pass


def test_offline_commit_refuses_if_domain_started(env: dict[str, Any]) -> None:
    env["dom"].active = False
    with _backup(env) as s:
        env["dom"].active = True  # someone started it while we read the images
        with pytest.raises(HypervisorError, match="started during the offline backup"):
            s.commit()
        assert not s.committed


def test_cleanup_failure_does_not_hide_the_original_error(env: dict[str, Any]) -> None:
    dom = env["dom"]
    with pytest.raises(RuntimeError) as ei, _backup(env):
        dom.job = None  # the job vanished: abortJob fails with OPERATION_INVALID (ignored)
        dom.checkpoints.clear()
        dom.abortJob = lambda: (_ for _ in ()).throw(fl.libvirtError("rpc", fl.VIR_ERR_RPC))
        raise RuntimeError("disk read failed")
    assert any("cleanup after the error also failed" in n for n in ei.value.__notes__)


def test_socket_path_too_long(env: dict[str, Any], tmp_path: Path) -> None:
    env["scratch"] = str(tmp_path / ("x" * 90))
    with pytest.raises(UsageError, match="too long"), _backup(env):
        pass


def test_blocking_ancestor(tmp_path: Path) -> None:
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    locked = tmp_path / "locked"
    inner = locked / "scratch"
    inner.mkdir(parents=True)
    os.chmod(locked, 0o700)
    blocked = st.blocking_ancestor(str(inner), "nobody")
    assert blocked is not None and str(inner).startswith(blocked)
    assert not os.stat(blocked).st_mode & 0o001
    open_dir = Path("/")
    assert st.blocking_ancestor(str(open_dir / "tmp"), "nobody") is None


def test_overlay_skips_readonly_disks(env: dict[str, Any]) -> None:
    fl.reset()
    disks = (fl.disk_xml("vda", "/img/a.qcow2")
             + fl.disk_xml("vdc", "/img/ro.qcow2", extra="<readonly/>"))
    fl.add_domain(fl.domain_xml("web", disks), sizes={"vda": 1 << 30, "vdc": 1 << 20})
    env["hv"] = connect()
    with _backup(env, method="overlay") as s:
        assert [d.info.target for d in s.disks] == ["vda", "vdc"]
        snap = ET.fromstring(fl.calls("snapshotCreateXML")[-1][0])
        modes = {d.get("name"): d.get("snapshot") for d in snap.iter("disk")}
        assert modes == {"vda": "external", "vdc": "no"}
    with _backup(env, method="overlay", disks=["vdc"]):
        assert len(fl.calls("snapshotCreateXML")) == 1  # nothing to overlay


# -- interrupted cleanup --------------------------------------------------------------------

def test_keyboard_interrupt_in_close_still_cleans_up(env: dict[str, Any]) -> None:
    dom = env["dom"]
    s = _backup(env)
    with pytest.raises(KeyboardInterrupt), s:
        def interrupted() -> None:
            raise KeyboardInterrupt

        s.disks[0].reader.close = interrupted  # type: ignore[method-assign]
    assert dom.job is None and not dom.checkpoints  # every later step still ran
    assert os.path.exists(os.path.join(s.workdir, "state.json"))  # kept for the next run


def test_keyboard_interrupt_inside_the_body_cleans_up(env: dict[str, Any]) -> None:
    dom = env["dom"]
    with pytest.raises(KeyboardInterrupt), _backup(env) as s:
        raise KeyboardInterrupt
    assert dom.job is None and not dom.checkpoints
    assert not os.path.exists(s.workdir)


def test_interrupt_right_after_backup_begin_aborts_our_job(env: dict[str, Any]) -> None:
    dom = env["dom"]
    real = dom.backupBegin

    def begin_then_interrupt(xml: str, cp: str | None, flags: int = 0) -> int:
        real(xml, cp, flags)
        raise KeyboardInterrupt  # Ctrl-C as libvirt returns

    dom.backupBegin = begin_then_interrupt
    with pytest.raises(KeyboardInterrupt), _backup(env):
        pass
    assert dom.job is None and not dom.checkpoints


def test_failed_backup_begin_leaves_a_foreign_job_alone(env: dict[str, Any]) -> None:
    dom = env["dom"]
    dom.job = "<domainbackup mode='pull'><server transport='unix' socket='/run/x.sock'/>" \
              "</domainbackup>"
    with pytest.raises(HypervisorError), _backup(env):
        pass
    assert dom.job is not None and "/run/x.sock" in dom.job


# -- orphaned bitmaps -----------------------------------------------------------------------

def test_full_backup_removes_our_orphaned_bitmaps(env: dict[str, Any]) -> None:
    dom = env["dom"]
    ours, theirs = f"{P}-20250101T000000.000Z", "vmdr-ffffffff-20250101T000000.000Z"
    dom.orphan_bitmaps = {ours, theirs, "backup-vda", "user-bitmap"}
    with _backup(env) as s:
        s.commit()
    assert dom.orphan_bitmaps == {theirs, "backup-vda", "user-bitmap"}
    removes = [a for c, a in fl.calls("qemuMonitorCommand") if c == "block-dirty-bitmap-remove"]
    assert removes == [{"node": "libvirt-1-format", "name": ours}]  # never the read-only node
    assert any("lost checkpoints" in w for w in s.warnings)


def test_incremental_does_not_touch_bitmaps(env: dict[str, Any]) -> None:
    dom = env["dom"]
    with _backup(env) as s:
        s.commit()
        cp = s.checkpoint
    dom.orphan_bitmaps = {f"{P}-20250101T000000.000Z"}
    with _backup(env, incremental_from=cp, now=T1) as s:
        assert any(d.incremental for d in s.disks)
        s.commit()
    assert dom.orphan_bitmaps == {f"{P}-20250101T000000.000Z"}


def test_bitmap_failure_is_a_warning(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from vmdr.hypervisor import bitmaps

    def boom(dom: Any, prefix: str) -> list[str]:
        raise HypervisorError("QMP query-named-block-nodes: nope")

    monkeypatch.setattr(bitmaps, "remove_running", boom)
    with _backup(env) as s:
        s.commit()
    assert s.committed and any("orphaned bitmaps" in w for w in s.warnings)


def test_offline_orphans_via_qemu_img() -> None:
    import json as _json

    from vmdr.hypervisor import bitmaps
    from vmdr.hypervisor.domain import DiskInfo

    fl.install()
    try:
        dom = fl.add_domain(fl.domain_xml("web", fl.disk_xml("vda", "/img/a.qcow2")),
                            active=False)
        dom.checkpointCreateXML(f"<domaincheckpoint><name>{P}-20250202T000000.000Z</name>"
                                "</domaincheckpoint>", 0)
        ran: list[list[str]] = []
        names = [f"{P}-20250101T000000.000Z", f"{P}-20250202T000000.000Z", "other"]

        def run(argv: Any) -> tuple[int, str, str]:
            ran.append(list(argv))
            info = {"format-specific": {"data": {"bitmaps": [{"name": n} for n in names]}}}
            return 0, _json.dumps(info), ""

        disks = [DiskInfo("vda", "/img/a.qcow2", "file", "qcow2"),
                 DiskInfo("vdb", "/img/b.raw", "file", "raw")]
        assert bitmaps.remove_offline(dom, disks, P, run) == [f"vda:{P}-20250101T000000.000Z"]
        assert ran[-1] == ["qemu-img", "bitmap", "--remove", "-f", "qcow2", "--",
                           "/img/a.qcow2", f"{P}-20250101T000000.000Z"]
        assert len(ran) == 2  # raw disk not inspected
    finally:
        fl.uninstall()


def test_offline_incremental_reads_the_checkpoints_qcow2_bitmaps(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped domain (a planned failover's final replica cycle) is read from its
    checkpoint's persistent bitmaps, not in full; raw disks and a bitmap qemu-nbd refuses
    (QEMU did not stop cleanly) are read in full."""
    with _backup(env) as s:
        s.commit()
    cp = s.checkpoint
    env["dom"].active = False
    opened: list[tuple[str, str | None]] = []
    refuse: set[str] = set()

    def reader(d: Any, lock: bool = False, bitmap: str | None = None) -> StubReader:
        if bitmap is not None and d.target in refuse:
            raise HypervisorError(f"{d.target}: NBD connect failed: bitmap is inconsistent")
        opened.append((d.target, bitmap))
        return StubReader(f"qemu:dirty-bitmap:{bitmap}" if bitmap else "file")

    monkeypatch.setattr(backup_mod, "_image_reader", reader)
    with _backup(env, now=T1, incremental_from=cp) as s:
        assert s.method == "offline" and s.checkpoint is None
        assert {d.info.target: d.incremental for d in s.disks} == {"vda": True, "vdb": False}
        assert opened == [("vda", cp), ("vdb", None)]
        assert any("vdb: full read" in w for w in s.warnings)
        s.commit()
    assert list(env["dom"].checkpoints) == [cp]  # kept: the next read starts from it again
    refuse.add("vda")
    opened.clear()
    with _backup(env, now=T1, incremental_from=cp) as s:
        assert not any(d.incremental for d in s.disks)
        assert opened == [("vda", None), ("vdb", None)]
        assert any("vda: full read (bitmap" in w and "inconsistent" in w for w in s.warnings)
