"""The replica cycle's logic against an in-memory source (dirty bitmaps per checkpoint) and
an in-memory DR site (images, internal snapshots, state file): what moves, what is kept,
what is refused before anything is touched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from vmdr.config import Config, VMConfig
from vmdr.errors import (
    ConfigError,
    DomainNotFound,
    HypervisorError,
    NetworkNotFound,
    NoSpace,
    UsageError,
    VMLocked,
)
from vmdr.hypervisor import DiskSource, Extent, is_ours
from vmdr.hypervisor.fake import FakeFleet, FakeHypervisor
from vmdr.jobs import replicate as rep
from vmdr.jobs.replica_scripts import Probe
from vmdr.jobs.replicate_site import Site
from vmdr.jobs.replicate_state import (
    MEETING,
    NO_TARGET,
    NOT_MEETING,
    ReplicaState,
    RestorePoint,
    changed_chunks,
    parse_network_map,
    pieces,
    replica_prefix,
    sla,
    to_rotate,
    unique_point,
)
from vmdr.jobs.vmlock import VMLock
from vmdr.plan.inventory import replica_decls

BLOCK = 64 << 10
SIZE = 64 * BLOCK  # 4 MiB
XML = """<domain type='kvm'><name>web</name><memory>1024</memory><vcpu>1</vcpu>
<os><type>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/src/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
<interface type='network'><mac address='52:54:00:00:00:01'/><source network='prod'/></interface>
</devices></domain>"""


class _Reader:
    def __init__(self, data: bytearray, dirty: set[int] | None) -> None:
        self.data, self.dirty, self.size = data, dirty, len(data)

    def extents(self) -> Iterator[Extent]:
        for b in range(self.size // BLOCK):
            if self.dirty is None:
                yield Extent(b * BLOCK, BLOCK, any(self.data[b * BLOCK:(b + 1) * BLOCK]))
            else:
                yield Extent(b * BLOCK, BLOCK, b in self.dirty)

    def read(self, off: int, ln: int) -> bytes:
        return bytes(self.data[off:off + ln])

    def close(self) -> None:
        pass


@dataclass
class _Job:
    src: SourceHV
    name: str
    inc: str | None
    disks: list[DiskSource] = field(default_factory=list)
    committed: bool = False
    method: str = "checkpoint"
    consistency: str = "crash"
    skipped: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def checkpoint(self) -> str:
        return self.name

    @property
    def checkpoint_xml(self) -> str:
        return f"<domaincheckpoint><name>{self.name}</name></domaincheckpoint>"

    def commit(self) -> None:
        self.committed = True
        prefix = self.name.rsplit("-", 1)[0]
        for c in list(self.src.cps):
            if c != self.name and c.rsplit("-", 1)[0] == prefix:
                del self.src.cps[c]

    def __enter__(self) -> _Job:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.src.cps.pop(self.name, None)


class SourceHV(FakeHypervisor):
    """The fake driver plus a backup side: one disk, a dirty set per checkpoint."""

    def __init__(self) -> None:
        fleet = FakeFleet()
        super().__init__(fleet.host("fake://src/system"))
        self.host.add_domain(XML, active=True, sizes={"vda": SIZE})
        self.disk = bytearray(SIZE)
        self.cps: dict[str, set[int]] = {}
        self.jobs: list[_Job] = []
        self.n = 0

    def write(self, off: int, data: bytes) -> None:
        self.disk[off:off + len(data)] = data
        for s in self.cps.values():
            s.update(range(off // BLOCK, (off + len(data) - 1) // BLOCK + 1))

    def backup(self, info: Any, *, checkpoint_prefix: str, scratch_dir: str, disks: Any = None,
               incremental_from: str | None = None, quiesce: bool = False,
               method: Any = "auto", now: Any = None) -> Any:
        self.n += 1
        name = f"{checkpoint_prefix}-{self.n:08d}"
        dirty = set(self.cps[incremental_from]) if incremental_from in self.cps else None
        self.cps[name] = set()
        job = _Job(self, name, incremental_from)
        d = next(x for x in info.disks if x.target == "vda")
        job.disks.append(DiskSource(d, dirty is not None, _Reader(bytearray(self.disk), dirty)))
        self.jobs.append(job)
        return job

    def list_checkpoints(self, info: Any, prefix: str) -> list[str]:
        return sorted(c for c in self.cps if c.startswith(prefix))

    def cleanup_leftovers(self, name: str, checkpoint_prefix: str, scratch_dir: str) -> list[str]:
        return []


class _Writer:
    def __init__(self, site: FakeSite, path: str) -> None:
        self.site, self.path = site, path
        if site.fail_writes:
            raise HypervisorError("link to the DR site lost")

    def write(self, off: int, data: bytes) -> None:
        img = self.site.images[self.path]
        img[off:off + len(data)] = data
        self.site.written += len(data)

    def zero(self, off: int, ln: int) -> None:
        self.site.images[self.path][off:off + ln] = bytes(ln)
        self.site.zeroed += ln

    def read(self, off: int, ln: int) -> bytes:
        return bytes(self.site.images[self.path][off:off + ln])

    def close(self, *, flush: bool = True) -> None:
        pass


class FakeSite(Site):
    def __init__(self, free: int = 1 << 40) -> None:
        self.uri, self.local, self.where = "fake://dr/system", True, "dr"
        self.files: dict[str, bytes] = {}
        self.images: dict[str, bytearray] = {}
        self.snaps: dict[str, dict[str, bytes]] = {}
        self.free, self.written, self.zeroed = free, 0, 0
        self.fail_writes = self.fail_commit = False
        self.calls: list[str] = []
        self.pins: set[str] = set()  # points a test failover reads
        self.overlays: set[str] = set()  # overlays over the standby's disks (HA, failover)
        self.busy: set[str] = set()  # ... held open by a QEMU
        self.aged: set[str] = set()  # markers written over 10 minutes ago

    def open(self) -> FakeSite:
        return self

    def close(self) -> None:
        pass

    def make_dir(self, directory: str) -> None:
        pass

    def free_bytes(self, directory: str) -> int:
        return self.free

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def write(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def create_image(self, path: str, size: int) -> None:
        self.images.setdefault(path, bytearray(size))
        self.snaps.setdefault(path, {})

    def snapshots(self, path: str) -> list[str]:
        return list(self.snaps[path])

    def add_snapshot(self, path: str, tag: str) -> None:
        self.snaps[path][tag] = bytes(self.images[path])

    def delete_snapshots(self, path: str, tags: list[str]) -> None:
        for t in tags:
            del self.snaps[path][t]

    def writer(self, path: str, fmt: str = "qcow2") -> Any:
        return _Writer(self, path)

    def pinned_points(self, directory: str) -> set[str]:
        return set(self.pins)

    def probe(self, directory: str) -> Probe:
        """What the DR host's guard script would report (see test_replica_guard.py)."""
        raw = self.files.get(f"{directory}/ha-inuse.json")
        p = Probe(json.loads(raw) if raw else None,
                  marker_aged=f"{directory}/ha-inuse.json" in self.aged,
                  failed_over=f"{directory}/failover.json" in self.files)
        for o in sorted(self.overlays):
            if o.startswith(f"{directory}/"):
                (p.busy if o in self.busy else p.overlays).append(o)
        return p

    def run(self, script: str, *args: str, input: bytes | None = None,
            ok: tuple[int, ...] = (0,), timeout: float = 600) -> Any:
        self.calls.append("run")
        if "rm -rf" in script and "ha-inuse.json" in script:  # replica_guard's release
            self.files.pop(f"{args[0]}/ha-inuse.json", None)
            self.overlays = {o for o in self.overlays if not o.startswith(f"{args[0]}/ha/")}
            return None
        raise AssertionError(f"unexpected command at the DR site: {script[:40]!r}")

    # the batched steps: one remote command each at a real site
    def begin(self, directory: str, names: list[str]) -> tuple[int, list[bytes | None]]:
        self.calls.append("begin")
        return self.free, [self.files.get(f"{directory}/{n}") for n in names]

    def serve(self, state: tuple[str, bytes] | None, disks: list[tuple[str, int | None, bool]],
              fmt: str = "qcow2") -> Any:
        self.calls.append("serve")
        if state is not None:
            self.files[state[0]] = state[1]
        ex = _Exports()
        for img, size, busy in disks:
            if size is not None:
                self.create_image(img, size)
            if busy:
                ex.writers[img] = _Writer(self, img)
        return ex

    def commit(self, files: list[tuple[str, bytes]], tag: str, images: list[str],
               drop: list[str]) -> None:
        self.calls.append("commit")
        if self.fail_commit:
            raise HypervisorError("qemu-img: snapshot failed")
        for path, data in files:
            self.files[path] = data
        for img in images:
            self.snaps[img][tag] = bytes(self.images[img])
            for t in drop:
                self.snaps[img].pop(t, None)


class _Exports:
    def __init__(self) -> None:
        self.writers: dict[str, _Writer] = {}
        self.stream = None

    def close(self, *, flush: bool = True) -> None:
        pass


@pytest.fixture(autouse=True)
def _locks(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_LOCK_DIR", str(tmp_path / "locks"))


def _env(**kw: Any) -> tuple[SourceHV, FakeHypervisor, FakeSite, rep.ReplicaSpec]:
    src = SourceHV()
    fleet = FakeFleet()
    fleet.host("fake://dr/system")
    target = fleet.connect("fake://dr/system")
    target.host.add_network("dr-net")
    site = FakeSite(**kw)
    spec = rep.ReplicaSpec(vm="web", target_uri="fake://dr/system", directory="/dr/web",
                           keep=2, network_map={"prod": "dr-net"}, rpo_target_s=600)
    return src, target, site, spec


def _state(site: FakeSite) -> ReplicaState:
    return ReplicaState.from_json(site.files["/dr/web/replica.json"], "test")


def test_seed_then_incrementals_move_only_changes_and_rotate_points() -> None:
    src, target, site, spec = _env()
    src.write(0, b"\x01" * BLOCK * 3)
    src.write(SIZE - BLOCK, b"\x02" * BLOCK)
    seed = rep.replicate_direct(src, target, site, spec)
    assert seed.mode == "seed" and seed.bytes_moved == 4 * BLOCK and seed.defined
    img = site.images["/dr/web/web-replica-vda.qcow2"]
    assert img == src.disk
    sdom = target.lookup("web-replica")
    assert not sdom.is_active() and sdom.uuid == _state(site).standby_uuid
    assert "dr-net" in sdom.xml() and "'prod'" not in sdom.xml()
    src.write(10 * BLOCK, b"\x03" * 100)  # one block dirty
    inc = rep.replicate_direct(src, target, site, spec)
    assert inc.mode == "incremental" and inc.bytes_moved == BLOCK and not inc.defined
    assert img == src.disk
    src.write(20 * BLOCK, bytes(BLOCK))  # dirty but zeros: a zero request, no data moved
    src.write(30 * BLOCK, b"\x04" * BLOCK)
    third = rep.replicate_direct(src, target, site, spec)
    assert third.bytes_moved == BLOCK and img == src.disk
    assert third.rotated == [seed.point]
    st = _state(site)
    assert [p.name for p in st.points] == [inc.point, third.point]
    assert list(site.snaps["/dr/web/web-replica-vda.qcow2"]) == [inc.point, third.point]
    assert [c.bytes_moved for c in st.cycles] == [4 * BLOCK, BLOCK, BLOCK]
    assert len([c for c in src.cps if c.startswith(st.prefix)]) == 1
    assert not st.writing and st.checkpoint in src.cps


def test_a_point_a_test_failover_reads_is_not_rotated_until_the_test_ends() -> None:
    src, target, site, spec = _env()
    spec.keep = 1
    seed = rep.replicate_direct(src, target, site, spec)
    site.pins = {seed.point or ""}  # a test failover reads the seed point
    src.write(0, b"\x05" * BLOCK)
    during = rep.replicate_direct(src, target, site, spec)
    assert during.rotated == [] and during.points == [seed.point, during.point]
    assert list(site.snaps["/dr/web/web-replica-vda.qcow2"]) == [seed.point, during.point]
    site.pins = set()  # the test ended
    src.write(BLOCK, b"\x06" * BLOCK)
    after = rep.replicate_direct(src, target, site, spec)
    assert after.rotated == [seed.point, during.point] and after.points == [after.point]


def test_backup_checkpoints_are_never_touched() -> None:
    src, target, site, spec = _env()
    src.cps["vmdr-0123456789ab-00000001"] = set()
    rep.replicate_direct(src, target, site, spec)
    src.write(0, b"x")
    rep.replicate_direct(src, target, site, spec)
    assert "vmdr-0123456789ab-00000001" in src.cps
    assert src.cps["vmdr-0123456789ab-00000001"] == {0}  # its changes still tracked
    prefix = replica_prefix("fake://dr/system", "/dr/web")
    assert not is_ours("vmdr-0123456789ab-20260101T000000.000Z", prefix)
    assert not is_ours(f"{prefix}-20260101T000000.000Z", "vmdr-0123456789ab")


def test_no_space_refused_before_writing() -> None:
    src, target, site, spec = _env(free=1 << 20)
    src.write(0, b"\x01" * SIZE)
    with pytest.raises(NoSpace):
        rep.replicate_direct(src, target, site, spec)
    assert site.written == 0 and "/dr/web/replica.json" not in site.files
    assert src.cps == {}  # the new checkpoint was not kept
    with pytest.raises(DomainNotFound):
        target.lookup("web-replica")


def test_bad_network_mapping_touches_nothing() -> None:
    src, target, site, spec = _env()
    spec.network_map = {"prod": "no-such-net"}
    with pytest.raises(NetworkNotFound, match="no-such-net"):
        rep.replicate_direct(src, target, site, spec)
    assert src.jobs == [] and site.files == {}
    spec.network_map = {}
    with pytest.raises(NetworkNotFound, match="has no mapping"):
        rep.replicate_direct(src, target, site, spec)


def test_unknown_vm_and_running_or_foreign_standby() -> None:
    src, target, site, spec = _env()
    with pytest.raises(DomainNotFound):
        rep.replicate_direct(src, target, site, rep.ReplicaSpec(
            vm="nope", target_uri=spec.target_uri, directory="/dr/nope"))
    rep.replicate_direct(src, target, site, spec)
    target.lookup("web-replica").start()
    with pytest.raises(UsageError, match="is running"):
        rep.replicate_direct(src, target, site, spec)
    target.lookup("web-replica").destroy()
    other = rep.ReplicaSpec(vm="web", target_uri=spec.target_uri, directory="/dr/other",
                            network_map=spec.network_map)
    with pytest.raises(UsageError, match="not this replica's standby"):
        rep.replicate_direct(src, target, site, other)


def test_interrupted_cycle_is_recorded_and_the_next_one_rereads() -> None:
    src, target, site, spec = _env()
    src.write(0, b"\x01" * BLOCK)
    first = rep.replicate_direct(src, target, site, spec)
    src.write(5 * BLOCK, b"\x05" * BLOCK)
    site.fail_writes = True
    with pytest.raises(HypervisorError, match="link"):
        rep.replicate_direct(src, target, site, spec)
    st = _state(site)
    assert st.writing and st.cycles[-1].error and [p.name for p in st.points] == [first.point]
    assert len([c for c in src.cps if c.startswith(st.prefix)]) == 1  # old one kept
    site.fail_writes = False
    again = rep.replicate_direct(src, target, site, spec)
    assert again.mode == "full" and site.images["/dr/web/web-replica-vda.qcow2"] == src.disk


def test_a_running_cycle_holds_the_vm_lock() -> None:
    src, target, site, spec = _env()
    with VMLock(src.uri, "web"), pytest.raises(VMLocked, match="another vmdr job"):
        rep.replicate_direct(src, target, site, spec)


def test_sla_states() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    st = ReplicaState("web", "u", "id", "web-replica", "sid", "t", "/d", "p", rpo_target_s=300)
    assert sla(st, now) == ("initializing", None)
    st.points = [RestorePoint("rp-1", (now - timedelta(seconds=120)).isoformat(), "direct",
                              "seed")]
    assert sla(st, now) == (MEETING, 120.0)
    assert sla(st, now + timedelta(minutes=10))[0] == NOT_MEETING
    st.rpo_target_s = None
    assert sla(st, now)[0] == NO_TARGET


def test_pure_helpers() -> None:
    assert list(pieces([(0, 10), (20, 25)], limit=10)) == [(0, 10), (20, 10), (30, 10),
                                                          (40, 5)]
    assert changed_chunks([b"a", b"b", b"c"], [b"a", b"x", b"c"]) == [1]
    assert changed_chunks(None, [b"a", b"b"]) == [0, 1]
    assert changed_chunks([b"a"], [b"a", b"b"]) == [0, 1]
    pts = [RestorePoint(f"rp-{i}", "", "direct", "incremental") for i in range(5)]
    assert [p.name for p in to_rotate(pts, 2)] == ["rp-0", "rp-1", "rp-2"]
    assert to_rotate(pts, 0) == pts[:4]  # the newest always stays
    assert unique_point("rp-x", ["rp-x", "rp-x-1"]) == "rp-x-2"
    assert parse_network_map(["a=b", " c = d "]) == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match="SOURCE=DR"):
        parse_network_map(["nope"])
    assert replica_prefix("qemu+ssh://dr/system?keyfile=/k", "/x/") == \
        replica_prefix("qemu+ssh://dr/system", "/x")
    with pytest.raises(UsageError):
        rep.ReplicaSpec(vm="a", target_uri="qemu:///system", directory="relative")
    with pytest.raises(UsageError):
        rep.ReplicaSpec(vm="a", target_uri="qemu:///system", directory="/d", keep=0)


def test_state_round_trip_and_bad_state() -> None:
    st = ReplicaState("web", "u", "id", "web-replica", "sid", "t", "/d", "p",
                      points=[RestorePoint("rp-1", "2026-01-01T00:00:00+00:00", "direct",
                                           "seed", 5)])
    again = ReplicaState.from_json(st.to_json(), "x")
    assert again == st
    from vmdr.errors import IntegrityError, UnsupportedFormat

    with pytest.raises(IntegrityError):
        ReplicaState.from_json(b"{nope", "x")
    with pytest.raises(UnsupportedFormat):
        ReplicaState.from_json(b'{"format": 99}', "x")


def _cfg(raw: dict[str, Any], vms: dict[str, dict[str, Any]]) -> Config:
    cfg = Config()
    cfg.path, cfg.raw = "estate.toml", raw
    cfg.vms = {n: VMConfig(extra=e) for n, e in vms.items()}
    return cfg


def test_inventory_replicas() -> None:
    cfg = _cfg({"replicas": {"to": "dr1", "points": 4, "rpo": "15m", "vms": ["web"],
                             "network_map": {"prod": "dr-net"}}},
               {"web": {}, "db": {"replica_to": "qemu+ssh://dr2/system",
                                  "replica_feed": "repository",
                                  "replica_network_map": {"back": "dr-back"}}},)
    d = replica_decls(cfg)
    assert sorted(d) == ["db", "web"]
    assert d["web"].to == "dr1" and d["web"].points == 4 and d["web"].rpo_s == 900
    assert d["db"].to == "qemu+ssh://dr2/system" and d["db"].feed == "repository"
    assert dict(d["db"].network_map) == {"prod": "dr-net", "back": "dr-back"}
    with pytest.raises(ConfigError, match="replica_colour"):
        replica_decls(_cfg({}, {"x": {"replica_to": "h", "replica_colour": "red"}}))
    with pytest.raises(ConfigError, match=r"replicas\.speed"):
        replica_decls(_cfg({"replicas": {"speed": 1}}, {}))
    with pytest.raises(ConfigError, match="to"):
        replica_decls(_cfg({"replicas": {"vms": ["a"]}}, {}))


def test_site_over_ssh_streams_zstd_frames_and_refuses_tcp() -> None:
    site = Site("qemu+ssh://root@dr1:2222/system?keyfile=/k/id&known_hosts=/k/kh")
    assert not site.local and "root@dr1:2222" in site.where
    assert site.stream and site.compress  # vmdr compresses the frames, not ssh
    argv = site._host.target.argv() if site._host else []
    assert "Compression=yes" not in argv and "/k/id" in argv
    assert "UserKnownHostsFile=/k/kh" in argv
    with pytest.raises(UsageError, match="ssh"):
        Site("qemu+tcp://dr1/system")
    assert Site("qemu:///system").local


def test_standby_xml_maps_networks_keeps_macs_and_its_uuid() -> None:
    src, _target, _site, spec = _env()
    st = rep._new_state(spec, src.uri, "u")
    xml = rep._standby_xml(XML, spec, st, {"vda": "/dr/web/web-replica-vda.qcow2"},
                           {"prod": "dr-net"}, "/dr/web/web-replica_VARS.fd")
    assert "<name>web-replica</name>" in xml and f"<uuid>{st.standby_uuid}</uuid>" in xml
    assert "network=\"dr-net\"" in xml or "network='dr-net'" in xml
    assert "52:54:00:00:00:01" in xml and "/dr/web/web-replica-vda.qcow2" in xml


def test_uefi_variables_travel_with_the_standby(monkeypatch: pytest.MonkeyPatch) -> None:
    src, target, site, spec = _env()
    monkeypatch.setattr(src, "read_nvram", lambda info: b"VARS")
    rep.replicate_direct(src, target, site, spec)
    assert site.files["/dr/web/web-replica_VARS.fd"] == b"VARS"
    assert "/dr/web/web-replica_VARS.fd" in target.lookup("web-replica").xml()


ESTATE = """
[locations.west]
kind = "building"
name = "West"
[hosts.dr1]
location = "west"
uri = "qemu+ssh://root@dr1/system"
target_dir = "/srv/images"
[replicas]
to = "dr1"
rpo = "15m"
vms = ["web"]
network_map = { prod = "dr-net" }
[vm.web]
rpo = "1h"
replica_points = 5
[vm.db]
rpo = "30m"
replica_to = "qemu:///system"
"""


def _ns(**kw: Any) -> Any:
    import argparse

    base = {"all": False, "to": None, "dir": None, "standby_name": None, "points": None,
            "feed": None, "network_map": None, "rpo": None, "consistency": "auto"}
    return argparse.Namespace(**{**base, **kw})


def test_cli_resolves_inventory_replicas(tmp_path: Any) -> None:
    from vmdr import config
    from vmdr.cli.common import Globals
    from vmdr.cli.replicate_cmds import _specs

    p = tmp_path / "estate.toml"
    p.write_text(ESTATE)
    g = Globals(repo=None, password_file=None, key_file=None, json=True, progress=False,
                config=config.load(str(p)))
    specs = {s.vm: s for s in _specs(_ns(all=True), g, [])}
    assert specs["web"].target_uri == "qemu+ssh://root@dr1/system"
    assert specs["web"].directory == "/srv/images/vmdr-replicas/web"
    assert specs["web"].keep == 5 and specs["web"].rpo_target_s == 900
    assert specs["web"].network_map == {"prod": "dr-net"}
    # [replicas] rpo is every replica's default; the VM's plan rpo only without one
    assert specs["db"].target_uri == "qemu:///system" and specs["db"].rpo_target_s == 900
    assert specs["db"].directory == "/var/lib/libvirt/images/vmdr-replicas/db"
    one = _specs(_ns(to="dr1", points=2, rpo="5m", network_map=["prod=other"]), g, ["web"])[0]
    assert one.keep == 2 and one.rpo_target_s == 300 and one.network_map == {"prod": "other"}
    with pytest.raises(UsageError, match="unknown DR host 'dr9'"):
        _specs(_ns(to="dr9"), g, ["web"])
    with pytest.raises(UsageError, match="no DR host"):
        _specs(_ns(), g, ["other"])
    p.write_text(ESTATE.replace('rpo = "15m"\n', ""))
    g.config = config.load(str(p))
    assert _specs(_ns(), g, ["db"])[0].rpo_target_s == 1800  # the plan's rpo


_LOGIN_S = 1.0  # long enough that a loaded CI machine cannot blur overlap and sequence


class _SlowSite:
    """Site stand-in whose login takes _LOGIN_S from start() (it runs in the background, as
    the ssh master does); open() waits for it."""

    def __init__(self, uri: str, fail: bool = False) -> None:
        self.uri, self.fail, self.closed = uri, fail, False
        self.started_at: float | None = None
        self.start_thread = 0
        self.reused = False

    def libvirt_uri(self) -> str:
        return self.uri

    def libvirt_forward(self) -> str | None:
        return None

    def ready_next(self) -> None:
        pass

    def start(self) -> _SlowSite:
        import threading
        import time

        self.started_at = time.monotonic()
        self.start_thread = threading.get_ident()
        return self

    def open(self) -> _SlowSite:
        import time

        if self.started_at is None:
            self.start()
        assert self.started_at is not None
        time.sleep(max(0.0, self.started_at + _LOGIN_S - time.monotonic()))
        if self.fail:
            from vmdr.errors import HypervisorUnavailable

            raise HypervisorUnavailable("ssh to dr1 failed: Connection refused")
        return self

    def prefetch(self, directory: str, names: list[str]) -> None:
        self.prefetched = (directory, names)

    def close(self) -> None:
        self.closed = True


def _spec() -> Any:
    from vmdr.jobs.replicate import ReplicaSpec

    return ReplicaSpec(vm="web", target_uri="qemu+ssh://root@dr1/system",
                       directory="/srv/r/web", standby="", keep=3, feed="direct",
                       rpo_target_s=None, network_map={}, consistency="auto",
                       scratch_dir="/tmp")


def test_cycle_makes_its_two_ssh_logins_at_once(monkeypatch: Any) -> None:
    """libvirt's qemu+ssh connection and the Site's control master overlap in time."""
    import time

    from vmdr.cli import replicate_cmds as rc

    sites: list[_SlowSite] = []

    def new_site(fail: bool = False) -> Any:
        """What ``Site(uri, ...)`` makes in this test: a _SlowSite, kept in ``sites``."""
        def make(uri: str, **kw: Any) -> _SlowSite:
            sites.append(_SlowSite(uri, fail=fail))
            return sites[-1]
        return make
    closed: list[str] = []

    class Target:
        def close(self) -> None:
            closed.append("target")

    def slow_connect(uri: str) -> Target:
        time.sleep(_LOGIN_S)
        return Target()

    monkeypatch.setattr(rc, "Site", new_site())
    monkeypatch.setattr(rc, "connect", slow_connect)
    t0 = time.monotonic()
    target, site = rc._open_target(_spec())
    took = time.monotonic() - t0
    assert cast(Any, site) is sites[0] and isinstance(target, Target)
    # the direct feed's first command ran as soon as the master was up
    assert sites[0].prefetched == ("/srv/r/web", ["replica.json"])
    assert took < 1.8 * _LOGIN_S, f"the two logins ran one after the other ({took:.2f} s)"
    assert not sites[0].closed and not closed
    # the ssh master is started by the cycle's own thread (its parent-death signal fires
    # when the thread that started it ends)
    import threading

    assert sites[0].start_thread == threading.get_ident()

    # the control master fails: the libvirt connection is closed, the error passes through
    from vmdr.errors import HypervisorUnavailable

    monkeypatch.setattr(rc, "Site", new_site(fail=True))
    with pytest.raises(HypervisorUnavailable, match="Connection refused"):
        rc._open_target(_spec())
    assert sites[-1].closed and closed == ["target"]

    # libvirt fails: the site is closed, the message is the usual one-liner
    def refused(uri: str) -> Target:
        raise HypervisorUnavailable(f"cannot connect to {uri}:\n no route")

    monkeypatch.setattr(rc, "Site", new_site())
    monkeypatch.setattr(rc, "connect", refused)
    with pytest.raises(HypervisorUnavailable, match=r"DR host .* unreachable") as ei:
        rc._open_target(_spec())
    assert "\n" not in ei.value.message
    assert sites[-1].closed
