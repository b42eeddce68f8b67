"""The operator side of HA on a FakeFleet: maintenance (live migration by the placement
rules), the non-disruptive failover test, and the watchdog's escalation to another host."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdr import config
from vmdr.errors import HypervisorError, UsageError
from vmdr.ha import hatest, maintenance
from vmdr.ha.escalate import Escalator
from vmdr.ha.fleet import Connect, OpsHost, live_state
from vmdr.ha.model import load_policy
from vmdr.ha.monitor import Monitor, WatchdogEvent
from vmdr.ha.records import HARecords, memory_records
from vmdr.ha.wdsettings import WatchdogSettings
from vmdr.hypervisor.fake import FakeFleet
from vmdr.plan import inventory

ESTATE = """
[locations.b1]
kind = "building"
[hosts.h1]
location = "b1"
uri = "fake://h1/system"
vcpus = 4
memory = "4GiB"
[hosts.h2]
location = "b1"
uri = "fake://h2/system"
migration_uri = "qemu+tcp://10.0.0.12/system"
vcpus = 4
memory = "4GiB"
[hosts.h3]
location = "b1"
uri = "fake://h3/system"
vcpus = 4
memory = "2GiB"
[plan.tiers.gold]
ha = true
[vm.db1]
host = "h1"
tier = "gold"
anti_affinity = "db"
[vm.db2]
host = "h2"
tier = "gold"
anti_affinity = "db"
[vm.web]
host = "h1"
"""

GIB = 1 << 30


def dom_xml(name: str, mib: int, vcpus: int = 1, disk: str | None = None) -> str:
    disk = disk or f"/shared/{name}.qcow2"
    return (f"<domain type='kvm'><name>{name}</name><memory unit='KiB'>{mib * 1024}</memory>"
            f"<vcpu>{vcpus}</vcpu><devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='qcow2'/><source file='{disk}'/>"
            "<target dev='vda' bus='virtio'/></disk>"
            "<interface type='network'><source network='default'/></interface>"
            "<serial type='file'><source path='/var/log/x.log'/></serial>"
            "</devices></domain>")


class Fleet:
    def __init__(self, text: str = ESTATE) -> None:
        self.cfg = config.parse(tomllib.loads(text), "estate.toml")
        self.inv = inventory.from_config(self.cfg)
        self.policy = load_policy(self.inv)
        self.fake = FakeFleet()
        for h in self.inv.hosts.values():
            assert h.uri
            self.fake.host(h.uri)
        self.now = 1_000_000.0
        self.shared = Path("/shared")  # the disks' directory (the fixture's: a tmp dir)
        self.records: HARecords = memory_records(clock=lambda: self.now)
        # migration URIs resolve to the fake hosts
        self.fake.hosts["qemu+tcp://10.0.0.12/system"] = self.fake.hosts["fake://h2/system"]

    def host(self, name: str):  # type: ignore[no-untyped-def]
        return self.fake.hosts[f"fake://{name}/system"]

    def run(self, host: str, name: str, mib: int, disk: str | None = None) -> None:
        rec = self.host(host).add_domain(dom_xml(name, mib, disk=disk), active=True)
        rec.agent = True

    @property
    def connect(self) -> Connect:
        def c(h: str) -> OpsHost:
            return self.fake.connect(f"fake://{h}/system")
        return c

    def where(self) -> dict[str, str]:
        out = {}
        for uri, h in self.fake.hosts.items():
            if not uri.startswith("fake://"):
                continue
            for n, r in h.domains.items():
                if r.active:
                    out[n] = uri.split("/")[2]
        return out


@pytest.fixture
def fl(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet()
    f.shared = tmp_path / "shared"
    f.shared.mkdir()
    f.run("h1", "db1", 1024, disk=str(f.shared / "db1.qcow2"))
    f.run("h1", "web", 1536)
    f.run("h2", "db2", 1024)
    yield f


def kinds(records: HARecords) -> list[str]:
    return [e["kind"] for e in records.events()]


def test_maintenance_migrates_by_placement_rules_and_marks_the_host(fl: Fleet) -> None:
    ev = maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h1", reason="BIOS")
    # db1 may not join db2 (anti-affinity) → h3; web goes where most memory is free → h2
    assert {m.vm: m.target for m in ev.moves} == {"db1": "h3", "web": "h2"}
    assert fl.where() == {"db1": "h3", "web": "h2", "db2": "h2"}
    assert fl.host("h1").domains == {}  # undefined at the source
    assert fl.records.maintenance()["h1"]["reason"] == "BIOS"
    assert kinds(fl.records) == ["maintenance", "migrated", "migrated"]
    mig = fl.records.events()[1]
    assert mig["vm"] == "db1" and mig["detail"]["to"] == "h3"
    # a host in maintenance is never a target: evacuating h2 cannot use h1
    with pytest.raises(maintenance.NowhereToGo) as ei:
        maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h2")
    assert ei.value.exit_code == 44 and "nothing moved" in ei.value.message
    assert "h2" not in fl.records.maintenance()
    assert fl.where() == {"db1": "h3", "web": "h2", "db2": "h2"}
    assert maintenance.leave(fl.inv, fl.records, "h1") is True
    assert maintenance.leave(fl.inv, fl.records, "h1") is False
    assert fl.records.maintenance() == {}


def test_maintenance_bad_input_moves_nothing(fl: Fleet) -> None:
    with pytest.raises(UsageError, match="unknown host 'h9'"):
        maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h9")
    fl.records.set_maintenance("h2", "x")
    fl.records.set_maintenance("h3", "x")
    with pytest.raises(maintenance.NowhereToGo, match="h1 is the last host up"):
        maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h1")
    assert "h1" not in fl.records.maintenance()
    assert fl.where()["db1"] == "h1" and kinds(fl.records) == []
    # nowhere to go for one VM (too big for anyone): refused as a whole
    fl.records.clear_maintenance("h2")
    fl.records.clear_maintenance("h3")
    fl.run("h3", "big", 3584)
    with pytest.raises(maintenance.NowhereToGo, match=r"big: needs 3\.5 GiB memory"):
        maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h3")
    assert fl.where()["big"] == "h3" and "h3" not in fl.records.maintenance()


def test_failed_migration_stops_and_says_what_moved(fl: Fleet) -> None:
    fl.host("h3").up = False  # db1's only anti-affinity-free host... is down now
    with pytest.raises(maintenance.NowhereToGo):
        maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h1")
    fl.host("h3").up = True
    fl.host("h3").add_domain(dom_xml("db1", 1024))  # a stale definition on the target
    with pytest.raises(HypervisorError, match=r"migrating db1 to h3 failed.*h1 stays in "
                                              "maintenance, 0 of 2"):
        maintenance.enter(fl.inv, fl.policy, fl.records, fl.connect, "h1")
    assert "h1" in fl.records.maintenance() and "gave-up" in kinds(fl.records)


def test_evacuation_json_names_moves() -> None:
    f = Fleet()
    f.run("h1", "db1", 1024)
    live = live_state(f.inv, f.connect, f.records)
    ev = maintenance.evacuation(f.inv, f.policy, live.state, "h1", live.running)
    assert ev.to_json()["moves"] == [{"vm": "db1", "from": "h1", "to": "h2", "seconds": None,
                                      "error": None}]
    assert maintenance.migration_uris(f.inv, "h2") == ("qemu+tcp://10.0.0.12/system",
                                                      "tcp://10.0.0.12")


def test_ha_test_boots_an_isolated_copy_on_the_failover_host(fl: Fleet, tmp_path: Path
                                                             ) -> None:
    made: list[tuple[str, str, str]] = []
    seen: list[str] = []
    real_create = type(fl.fake.connect("fake://h3/system")).create_transient

    def spy(self, xml):  # type: ignore[no-untyped-def]
        seen.append(xml)
        d = real_create(self, xml)
        self.host.domains[d.name].agent = True
        return d

    type(fl.fake.connect("fake://h3/system")).create_transient = spy  # type: ignore[method-assign]
    try:
        res = hatest.run_test(fl.inv, fl.policy, fl.records, fl.connect, "db1",
                              make_overlay=lambda *a: made.append(a),
                              evidence_dir=str(tmp_path))
    finally:
        type(fl.fake.connect("fake://h3/system")).create_transient = real_create  # type: ignore[method-assign]
    assert res.ok, res.error
    assert (res.source, res.target) == ("h1", "h3")  # anti-affinity keeps it off h2
    assert made and made[0][1:] == (str(fl.shared / "db1.qcow2"), "qcow2")
    xml = seen[0]
    assert "<interface" not in xml and "db1.qcow2" not in xml and res.copy in xml
    assert made[0][0] in xml and "/var/log/x.log" not in xml
    assert fl.where()["db1"] == "h1"  # production untouched
    assert all(not n.startswith("vmdr-hatest") for n in fl.host("h3").domains)
    t = fl.records.tests()["db1"]
    assert (t.kind, t.source, t.target, t.time) == ("test", "h1", "h3", fl.now)
    assert kinds(fl.records) == ["tested"]
    assert fl.host("h1").domains["db1"].frozen == 0  # production's overlay merged back


def test_ha_test_failure_is_an_event_not_a_pass(fl: Fleet, tmp_path: Path) -> None:
    res = hatest.run_test(fl.inv, fl.policy, fl.records, fl.connect, "db1",
                          make_overlay=lambda *a: None, evidence_dir=str(tmp_path),
                          timeout=0.01)
    assert not res.ok and "did not answer" in (res.error or "")
    assert fl.records.tests() == {} and kinds(fl.records) == ["tested"]
    assert all(not n.startswith("vmdr-hatest") for n in fl.host("h3").domains)
    with pytest.raises(UsageError, match="web is not under HA"):
        hatest.run_test(fl.inv, fl.policy, fl.records, fl.connect, "web",
                        make_overlay=lambda *a: None, evidence_dir=str(tmp_path))
    with pytest.raises(UsageError, match="unknown VM"):
        hatest.run_test(fl.inv, fl.policy, fl.records, fl.connect, "nope",
                        make_overlay=lambda *a: None, evidence_dir=str(tmp_path))


def test_test_xml_rewrites_what_would_collide() -> None:
    out = hatest.test_xml(dom_xml("a", 64).replace("<name>a</name>",
                                                   "<name>a</name><uuid>u-1</uuid>"),
                          "copy", {"vda": "/s/copy-vda.qcow2"}, "/s/copy.log")
    assert "<uuid>" not in out and "<name>copy</name>" in out
    assert "/s/copy-vda.qcow2" in out and "/s/copy.log" in out and "<interface" not in out


def test_watchdog_escalation_restarts_on_another_host(fl: Fleet, tmp_path: Path) -> None:
    esc = Escalator(fl.inv, fl.policy, fl.connect, "h1", fl.records)
    s = WatchdogSettings("db1", enabled=True, restart_budget=0, evidence_dir=str(tmp_path))
    fl.host("h1").crash("db1")
    mon = Monitor(lambda: fl.fake.connect("fake://h1/system"), [s], escalate=esc)
    evs = mon.cycle()
    assert [e.kind for e in evs] == ["detected", "escalated"]
    assert fl.where()["db1"] == "h3" and "db1" not in fl.host("h1").domains
    assert kinds(fl.records) == ["placed", "started"]
    # nowhere to go: the alert is raised
    fl.run("h1", "db3", 512)
    esc3 = Escalator(fl.inv, fl.policy, fl.connect, "h1", fl.records)
    fl.host("h2").up = fl.host("h3").up = False
    assert esc3("db3", WatchdogEvent("t", "db3", "escalated", "x")) is False
    assert fl.where()["db3"] == "h1" and kinds(fl.records)[-1] == "gave-up"


def test_dashboard_without_etcd_says_ha_needs_a_fleet() -> None:
    from types import SimpleNamespace

    from vmdr.agent.web_ha import NO_FLEET, ha_status
    a = SimpleNamespace(cfg=SimpleNamespace(agent=SimpleNamespace(etcd=[])), coord=None,
                        host="h1")
    assert ha_status(a) == {"fleet": False, "message": NO_FLEET}  # type: ignore[arg-type]
    assert NO_FLEET.startswith("HA needs a fleet (etcd)")


def test_admission_refuses_the_vm_that_breaks_n_plus_1_or_warns() -> None:
    from vmdr.ha import admission
    from vmdr.ha.model import state_from_inventory
    text = ESTATE + """
[vm.big]
host = "h2"
ha = true
vcpus = 1
memory = "3584MiB"
[vm.db1b]
host = "h3"
ha = true
vcpus = 1
memory = "512MiB"
"""
    for k in ("db1", "db2"):
        text = text.replace(f"[vm.{k}]\nhost", f"[vm.{k}]\nvcpus = 1\nmemory = \"1GiB\"\nhost")
    f = Fleet(text)
    state = state_from_inventory(f.inv)
    policy, refused = admission.enforce(f.policy, state)
    # big (3.5 GiB) fits nowhere if h2 fails once the others are admitted (priority, name)
    assert list(refused) == ["big"] and "big" not in policy.vms and "db1" in policy.vms
    assert "if h2 fails" in refused["big"]
    assert admission.check(policy, state).ok
    warn = Fleet(text.replace("[plan.tiers.gold]", "[ha]\nadmission = \"warn\"\n"
                                                   "[plan.tiers.gold]"))
    policy, refused = admission.enforce(warn.policy, state)
    assert list(refused) == ["big"] and "big" in policy.vms
