"""A replica that an HA copy (or a failover) runs on is never written, reverted or rotated.

The HA start from a replica puts qcow2 overlays over the standby's disks (``<dir>/ha/``) and
runs the VM on them: the standby's disks are their backing files. Before
:mod:`vmdr.jobs.replica_guard`, a replica cycle (direct or repository feed) checked only
the *standby domain* and wrote into those backing files (proven first with these fakes:
the cycle ran and changed the base under the overlays). Here: the in-memory DR site of
test_replica.py, plus the DR host's real guard, serve and commit scripts on real qcow2
files (qemu-img, qemu-nbd; no guest)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.test_replica import BLOCK, XML, FakeSite, _env, _locks, _state  # noqa: F401
from vmdr.errors import ReplicaInUse, UsageError, VMLocked
from vmdr.hypervisor.fake import FakeHypervisor
from vmdr.jobs import failover_site as fs
from vmdr.jobs import replica_guard
from vmdr.jobs import replicate as rep
from vmdr.jobs import replicate_repo as rr
from vmdr.jobs.replica_scripts import _COMMIT, _FREE, commit_args
from vmdr.jobs.replicate_site import Site
from vmdr.jobs.replicate_state import ReplicaState, replica_prefix
from vmdr.plan.recovery import PlanVM

IMG = "/dr/web/web-replica-vda.qcow2"
OVL = "/dr/web/ha/vda.qcow2"


def _ha_copy(target: Any, site: FakeSite, *, running: bool = True) -> None:
    """What start_from_replica leaves at the DR host: the marker, an overlay over the
    standby's disk and the VM defined under its own name on it."""
    site.files["/dr/web/ha-inuse.json"] = replica_guard.marker("web", "h3", [OVL], "rp-1")
    site.overlays.add(OVL)
    if running:
        site.busy.add(OVL)
    xml = target.lookup("web-replica").xml(inactive=True)
    xml = xml.replace("<name>web-replica</name>", "<name>web</name>").replace(IMG, OVL)
    import re

    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml)
    target.define(xml)
    if running:
        target.lookup("web").start()


def _seeded() -> tuple[Any, Any, FakeSite, rep.ReplicaSpec]:
    src, target, site, spec = _env()
    src.write(0, b"\x01" * BLOCK)
    rep.replicate_direct(src, target, site, spec)
    return src, target, site, spec


@pytest.mark.parametrize("running", [True, False])
def test_a_cycle_never_writes_under_an_ha_copy(running: bool) -> None:
    src, target, site, spec = _seeded()
    _ha_copy(target, site, running=running)
    base, snaps = bytes(site.images[IMG]), dict(site.snaps[IMG])
    state = site.files["/dr/web/replica.json"]
    src.write(5 * BLOCK, b"\x09" * BLOCK)  # the failed host is back and its VM wrote
    calls = len(site.calls)
    with pytest.raises(ReplicaInUse) as ei:
        rep.replicate_direct(src, target, site, spec)
    msg = ei.value.message
    assert ei.value.exit_code == 13 and isinstance(ei.value, VMLocked) and "\n" not in msg
    assert "in use by the HA copy of web on h3 since " in msg
    assert ("(running)" if running else "not running: its overlays hold its data") in msg
    assert "vmdr replicate release web" in msg
    assert bytes(site.images[IMG]) == base and site.snaps[IMG] == snaps  # nothing touched
    assert site.files["/dr/web/replica.json"] == state
    assert site.calls[calls:] == ["begin"]  # refused in the first command's answer
    prefix = replica_prefix(spec.target_uri, spec.directory)
    assert [c for c in src.cps if c.startswith(prefix)] == [_state(site).checkpoint]


def test_the_repository_feed_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    _src, target, site, spec = _seeded()
    _ha_copy(target, site, running=False)
    snap = SimpleNamespace(meta={"config": {"domain_xml": XML, "uuid": _state(site).source_uuid}},
                           disks=[SimpleNamespace(name="vda")], id="s1", short_id="s1")
    monkeypatch.setattr(rr, "newest_snapshot", lambda repo, vm, ref=None: snap)
    before = bytes(site.images[IMG])
    with pytest.raises(ReplicaInUse, match="in use by the HA copy of web"):
        rr.replicate_from_repository(object(), target, site, spec)  # type: ignore[arg-type]
    assert bytes(site.images[IMG]) == before


def test_a_stale_marker_is_cleared_and_the_cycle_goes_on() -> None:
    src, target, site, spec = _seeded()
    # the HA start wrote its marker, then died before it made the overlays
    site.files["/dr/web/ha-inuse.json"] = replica_guard.marker("web", "h3", [OVL], "rp-1")
    src.write(0, b"\x02" * BLOCK)
    with pytest.raises(ReplicaInUse):  # not yet: an HA start may be making its overlays
        rep.replicate_direct(src, target, site, spec)
    site.aged.add("/dr/web/ha-inuse.json")  # 10 minutes later
    r = rep.replicate_direct(src, target, site, spec)
    assert r.mode == "incremental" and site.images[IMG] == src.disk
    assert any("cleared a stale HA marker" in w for w in r.warnings)
    assert "/dr/web/ha-inuse.json" not in site.files


def test_overlays_nobody_uses_are_kept_until_released() -> None:
    src, target, site, spec = _seeded()
    _ha_copy(target, site, running=True)
    with pytest.raises(ReplicaInUse, match=r"still in use by the HA copy.*domain"):
        replica_guard.release(site, target, "/dr/web", "web")
    target.lookup("web").destroy()
    with pytest.raises(ReplicaInUse, match=r"web \(defined\)"):
        replica_guard.release(site, target, "/dr/web", "web")  # its data are on them
    site.busy.clear()
    target.lookup("web").undefine()  # the VM is home (its copy here undefined)
    with pytest.raises(ReplicaInUse):  # no domain, but the overlays hold data: kept
        rep.replicate_direct(src, target, site, spec)
    out = replica_guard.release(site, target, "/dr/web", "web")
    assert out["removed"] == [OVL] and "/dr/web/ha-inuse.json" not in site.files
    with pytest.raises(UsageError, match="nothing to release"):
        replica_guard.release(site, target, "/dr/web", "web")
    src.write(0, b"\x03" * BLOCK)
    assert rep.replicate_direct(src, target, site, spec).bytes_moved == BLOCK


def test_a_failed_over_replica_is_not_written_before_failback() -> None:
    src, target, site, spec = _seeded()
    site.files["/dr/web/failover.json"] = b"{}"
    site.overlays.add("/dr/web/failover/vda.qcow2")
    with pytest.raises(ReplicaInUse, match=r"in use by a failover of web.*vmdr failback"):
        rep.replicate_direct(src, target, site, spec)


_SITES = fs.Sites


def _sites(target: Any, site: FakeSite) -> fs.Sites:
    s = _SITES()
    # a connection of its own to the DR host (closed with the Sites)
    s.hvs["fake://dr/system"] = FakeHypervisor(target.host)
    s.sites["fake://dr/system"] = site
    return s


def test_failover_test_failover_failback_and_ha_refuse_an_ha_copys_replica() -> None:
    _src, target, site, _spec = _seeded()
    pv = PlanVM("web", "fake://dr/system", "dr", "/dr/web", "web-replica", None, None, ())
    assert fs.load_vm(_sites(target, site), pv).warnings == []
    _ha_copy(target, site, running=False)
    with pytest.raises(ReplicaInUse, match="a failover, test failover or failback never"):
        fs.load_vm(_sites(target, site), pv)


class _HASite(FakeSite):
    """The DR site of an HA start: the revert and the overlay script, in order."""

    def mark_in_use(self, directory: str, marker: bytes) -> None:
        self.calls.append("mark")
        self.files[f"{directory}/ha-inuse.json"] = marker

    def run(self, script: str, *args: str, input: bytes | None = None,
            ok: tuple[int, ...] = (0,), timeout: float = 600) -> Any:
        if "snapshot -a" in script:
            self.calls.append("revert")
            self.images[args[0]][:] = self.snaps[args[0]][args[1]]
            return None
        if "qemu-img create" in script:
            self.calls.append("overlays")
            self.overlays.update(args[2::2])
            return None
        return super().run(script, *args, input=input, ok=ok, timeout=timeout)


def _ha_start(monkeypatch: pytest.MonkeyPatch, target: Any, site: FakeSite,
              point: str) -> None:
    from vmdr.agent import ha_replica

    monkeypatch.setattr(fs, "Sites", lambda: _sites(target, site))
    decl = SimpleNamespace(to="h3", directory="/dr", standby="web-replica",
                           network_map={})
    inv = SimpleNamespace(replicas={"web": decl},
                          hosts={"h3": SimpleNamespace(target_dir="/dr")})
    cfg = SimpleNamespace(connect="fake://dr/system")
    ha_replica.start_from_replica(cfg, inv, "web", "h3", point)  # type: ignore[arg-type]


def test_ha_start_marks_the_replica_before_touching_it(monkeypatch: pytest.MonkeyPatch) -> None:
    src, target, site0, spec = _seeded()
    site = _HASite()
    site.__dict__.update({k: v for k, v in site0.__dict__.items() if k != "calls"})
    point = _state(site).points[-1].name
    _ha_start(monkeypatch, target, site, point)
    assert site.calls == ["mark", "revert", "overlays"]
    m = json.loads(site.files["/dr/web/ha-inuse.json"])
    assert (m["vm"], m["host"], m["overlays"], m["point"]) == ("web", "h3", [OVL], point)
    assert target.lookup("web").is_active() and not target.lookup("web-replica").is_active()
    site.busy.add(OVL)
    with pytest.raises(ReplicaInUse):
        rep.replicate_direct(src, target, site, spec)
    # a second HA start (the copy failed again) must not revert under the first one
    from vmdr.agent.ha_replica import ReplicaUnusable, newest_point

    with pytest.raises(ReplicaInUse):
        _ha_start(monkeypatch, target, site, point)
    with pytest.raises(ReplicaUnusable, match="in use by the HA copy"):
        cfg = SimpleNamespace(connect="fake://dr/system")
        inv = SimpleNamespace(replicas={"web": SimpleNamespace(
            to="h3", directory="/dr", standby="web-replica", network_map={})},
            hosts={"h3": SimpleNamespace(target_dir="/dr")})
        newest_point(cfg, inv, "web", "h3")  # type: ignore[arg-type]


def test_a_failed_ha_start_takes_its_marker_away(monkeypatch: pytest.MonkeyPatch) -> None:
    src, target, site0, spec = _seeded()
    site = _HASite()
    site.__dict__.update({k: v for k, v in site0.__dict__.items() if k != "calls"})
    def boom(self: Any) -> None:
        raise VMLocked("start refused")

    from vmdr.hypervisor import fake

    monkeypatch.setattr(fake.FakeDomain, "start", boom)
    with pytest.raises(VMLocked, match="start refused"):
        _ha_start(monkeypatch, target, site, _state(site).points[-1].name)
    assert "/dr/web/ha-inuse.json" not in site.files and not site.overlays
    assert "web" not in target.list_domains()
    monkeypatch.undo()
    src.write(0, b"\x04" * BLOCK)
    assert rep.replicate_direct(src, target, site, spec).mode == "incremental"


# -- the DR host's scripts, for real (qemu-img, qemu-nbd; no guest) ---------------------------


def _img(path: Path, backing: Path | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*argv, str(path), "64M"], check=True)


def test_the_begin_script_reports_marker_and_overlays_busy_or_not(tmp_path: Path) -> None:
    d = tmp_path / "web"
    (d / "ha").mkdir(parents=True)
    _img(d / "web-replica-vda.qcow2")
    site = Site("qemu:///system")
    site.begin(str(d), ["replica.json"])
    assert site.probe(str(d)).clear
    (d / "ha-inuse.json").write_bytes(replica_guard.marker("web", "h3", [], "rp-1"))
    _img(d / "ha" / "vda.qcow2", d / "web-replica-vda.qcow2")
    site.begin(str(d), ["replica.json"])
    p = site.probe(str(d))
    assert p.marker is not None and p.marker["host"] == "h3" and not p.marker_aged
    assert p.overlays == [str(d / "ha" / "vda.qcow2")] and p.busy == []
    # a process holding the overlay read-write (as the HA copy's QEMU does)
    nbd = subprocess.Popen(["qemu-nbd", "--persistent", f"--socket={tmp_path}/s.sock",
                            "--", str(d / "ha" / "vda.qcow2")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "s.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        p = site.probe(str(d))  # the standalone probe (not cached by a begin)
        assert p.busy == [str(d / "ha" / "vda.qcow2")] and p.overlays == []
        assert "(running)" in replica_guard.describe(p, "web")
    finally:
        nbd.terminate()
        nbd.wait(30)
    subprocess.run(["touch", "-d", "-11 minutes", str(d / "ha-inuse.json")], check=True)
    assert site.probe(str(d)).marker_aged
    assert site.run(_FREE, str(d)).returncode == 0


def test_commit_and_serve_refuse_when_the_marker_appeared_meanwhile(tmp_path: Path) -> None:
    d = tmp_path / "web"
    d.mkdir()
    img = d / "web-replica-vda.qcow2"
    _img(img)
    site = Site("qemu:///system")
    st = ReplicaState(vm="web", source_uri="x", source_uuid="u", standby="web-replica",
                      standby_uuid="v", target_uri="x", directory=str(d), prefix="p",
                      feed="direct", keep=2)
    (d / "ha-inuse.json").write_bytes(b"{}")
    with pytest.raises(ReplicaInUse, match="appeared during the cycle"):
        site.commit([(str(d / "replica.json"), st.to_json())], "rp-x", [str(img)], [])
    with pytest.raises(ReplicaInUse, match="appeared during the cycle"):
        site.serve((str(d / "replica.json"), st.to_json()), [(str(img), None, True)])
    assert not (d / "replica.json").exists()
    out = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(img)], capture_output=True,
                         text=True, check=True).stdout
    assert "rp-x" not in out
    (d / "ha-inuse.json").unlink()
    args, data = commit_args([(str(d / "replica.json"), st.to_json())], "rp-x", [str(img)], [])
    subprocess.run(["sh", "-c", _COMMIT, "vmdr", *args], input=data, check=True)
    assert (d / "replica.json").exists()


# -- vmdr replicate status / release ----------------------------------------------------------


def test_status_row_of_a_replica_in_use_is_not_meeting_its_sla() -> None:
    from vmdr.jobs.replica_status import IN_USE, row

    _src, _target, site, _spec = _seeded()
    st = _state(site)
    assert row(st, "web", "dr", rpo=600)["sla"] == "meeting-sla"
    used = "in use by the HA copy of web on h3 since 2026-12-06T10:00:00+00:00 (running)"
    r = row(st, "web", "dr", rpo=600, used=used)
    assert (r["sla"], r["sla_label"], r["in_use"]) == (IN_USE, "In use: not replicated", used)


def test_cli_release_frees_the_replica_once_nothing_uses_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from vmdr.cli import replicate_cmds
    from vmdr.cli.main import main
    from vmdr.hypervisor.fake import FakeFleet

    fleet = FakeFleet()
    host = fleet.host("fake://dr/system")
    monkeypatch.setattr(replicate_cmds, "connect", lambda uri: FakeHypervisor(host))
    d = tmp_path / "web"
    (d / "ha").mkdir(parents=True)
    _img(d / "web-replica-vda.qcow2")
    _img(d / "ha" / "vda.qcow2", d / "web-replica-vda.qcow2")
    (d / "ha-inuse.json").write_bytes(replica_guard.marker("web", "h3", [], "rp-1"))
    argv = ["replicate", "release", "web", "--to", "qemu:///system", "--dir", str(tmp_path)]
    host.add_domain(XML.replace("/src/web.qcow2", str(d / "ha" / "vda.qcow2")), active=False)
    assert main(argv) == 13  # the copy is still defined here: its data are on the overlay
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "web (defined)" in err and (d / "ha").exists()
    FakeHypervisor(host).lookup("web").undefine()
    assert main(argv) == 0
    assert "1 overlay(s) removed" in capsys.readouterr().out
    assert not (d / "ha").exists() and not (d / "ha-inuse.json").exists()
    assert (d / "web-replica-vda.qcow2").exists()  # the standby's disk stays
    assert main(argv) == 2 and "nothing to release" in capsys.readouterr().err
