"""Recovery plans in the config ([recovery_plans.NAME]), run reports and the hot site's
run book: pure parts, no libvirt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmdr import config as configmod
from vmdr.errors import ConfigError
from vmdr.plan import hotsite, recovery
from vmdr.plan import recovery_runs as runs

BASE: dict[str, Any] = {
    "hosts": {"dr1": {"location": "dc2", "uri": "qemu+ssh://root@dr1/system",
                      "target_dir": "/srv/images"}},
    "locations": {"dc2": {"kind": "building", "name": "DC 2"}},
    "vm": {
        "db": {"boot_group": 1, "replica_to": "dr1", "replica_rpo": "15m"},
        "app": {"boot_group": 2, "depends_on": ["db"], "replica_to": "dr1"},
        "web": {"boot_group": 2, "depends_on": ["app"], "replica_to": "dr1"},
        "lone": {},
    },
}


def _cfg(plans: dict[str, Any], **extra: Any) -> configmod.Config:
    return configmod.parse({**BASE, "recovery_plans": plans, **extra}, "estate.toml")


def _err(plans: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        recovery.load_plans(_cfg(plans))
    assert e.value.exit_code == 2 and "\n" not in e.value.message
    return e.value.message


def test_a_plan_takes_its_order_groups_and_replicas_from_the_inventory() -> None:
    p = recovery.load_plans(_cfg({"shop": {
        "vms": ["web", "app", "db"], "ready": "agent", "ready_delay": "5s",
        "network_map": {"lan": "dr-lan"}, "test_network_map": {"lan": "bubble"},
        "reip_rules": [{"from": "10.0.1.0/24", "to": "10.9.1.0/24", "test_to": "192.168.7.0/24",
                        "gateway": "10.9.1.1", "dns": ["10.9.1.53"]}],
        "groups": {"2": {"ready": "tcp:443", "delay": "0s", "post": ["guest:/bin/true"]}},
    }}))["shop"]
    assert p.order() == ["db", "app", "web"]
    assert [(g.number, g.vms, g.ready, g.delay_s) for g in p.groups] == [
        (1, ("db",), "agent", 5.0), (2, ("app", "web"), "tcp:443", 0.0)]
    db = p.vms["db"]
    assert (db.to, db.host, db.directory, db.standby) == (
        "qemu+ssh://root@dr1/system", "dr1", "/srv/images/vmdr-replicas/db", "db-replica")
    assert p.rpo_target("db") == 900 and p.rpo_target("web") is None
    rule = p.reip_rules[0]
    assert rule.map("10.0.1.23") == "10.9.1.23/24"
    assert rule.map("10.0.1.23", test=True) == "192.168.7.23/24"
    assert rule.map("10.0.2.23") is None
    assert p.as_dict()["groups"][1]["post"] == ["guest:/bin/true"]


@pytest.mark.parametrize(("plans", "expected"), [
    ({"p": {"vms": ["db", "nope"]}}, "recovery_plans.p.vms: unknown VM 'nope'"),
    ({"p": {"vms": ["lone"]}}, "recovery_plans.p.vms: lone has no replica"),
    ({"p": {"vms": ["web", "app"]}}, "recovery_plans.p.vms: app depends on db, which is not"),
    ({"p": {"vms": ["db"], "ready": "ping"}}, "recovery_plans.p.ready: expected agent"),
    ({"p": {"vms": ["db"], "groups": {"3": {}}}}, "boot group 3 has no VM of this plan"),
    ({"p": {"vms": ["db"], "groups": {"1": {"pre": ["rm -rf /"]}}}},
     "recovery_plans.p.groups.1.pre: expected host:COMMAND or guest:COMMAND"),
    ({"p": {"vms": ["db"], "reip_rules": [{"from": "10.0.0.0/8"}]}},
     "recovery_plans.p.reip_rules[0].to: missing"),
    ({"p": {"vms": ["db"], "reip_rules": [{"from": "x", "to": "10.1.0.0/16"}]}},
     "reip_rules[0].from: expected an IPv4 subnet"),
    ({"p": {"vms": ["db"], "reip_rules": [{"from": "10.0.0.0/16", "to": "10.1.0.0/16",
                                            "gateway": "10.2.0.1"}]}},
     "reip_rules[0].gateway: 10.2.0.1 is not in 10.1.0.0/16"),
    ({"p": {"vms": ["db"], "dr_host": "dr9"}}, "recovery_plans.p.dr_host: unknown DR host"),
    ({"p": {"vms": ["db"], "colour": "red"}}, "recovery_plans.p.colour: unknown setting"),
    ({"p": {"vms": ["db"], "reip": "redhat"}}, "recovery_plans.p.reip: expected auto"),
    ({"report": {"vms": ["db"]}}, "not 'report'"),
    ({"p": {"vms": []}}, "recovery_plans.p.vms: missing"),
])
def test_a_broken_plan_is_one_line_naming_the_key(plans: dict[str, Any], expected: str) -> None:
    msg = _err(plans)
    assert msg.startswith("estate.toml: ") or "recovery_plans" in msg
    assert expected in msg


def test_a_cycle_is_refused_by_the_inventory_first() -> None:
    cfg = configmod.parse({**BASE, "vm": {**BASE["vm"], "db": {
        "replica_to": "dr1", "depends_on": ["web"], "boot_group": 2}},
        "recovery_plans": {"p": {"vms": ["db", "app", "web"]}}}, "estate.toml")
    with pytest.raises(ConfigError, match="dependency cycle"):
        recovery.load_plans(cfg)


def test_unknown_plan_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown recovery plan 'x' \(known: a, b\)"):
        recovery.plan_named(_cfg({"a": {"vms": ["db"]}, "b": {"vms": ["db"]}}), "x")


def _report(kind: str = "test", when: str = "20261206T040000Z") -> runs.RunReport:
    return runs.RunReport(
        f"{when}-shop-{kind}", "shop", kind, "2026-12-06T04:00:00+00:00", outcome="passed",
        duration_s=30.0, steps=[runs.Step("start", "2026-12-06T04:00:01+00:00", 0.5, vm="db",
                                          detail="<script>x</script>")],
        vms=[runs.VMOutcome("db", "ready", 1, "rp-1", None, 0.0, 21.5, "agent", 9.0)])


def test_reports_are_written_listed_found_and_escaped(tmp_path: Path) -> None:
    js, html = runs.write(str(tmp_path), _report())
    runs.write(str(tmp_path), _report("planned", "20261206T050000Z"))
    doc = json.loads(Path(js).read_text())
    assert doc["rto_s"] == 21.5 and doc["vms"][0]["rpo_s"] == 0.0
    page = Path(html).read_text()
    assert "&lt;script&gt;" in page and "<script>x" not in page
    assert "Measured RTO" in page
    assert [r.kind for r in runs.list_runs(str(tmp_path))] == ["test", "planned"]
    assert runs.load_run(str(tmp_path), "050000Z-shop-planned").kind == "planned"
    last = runs.last_run(str(tmp_path), "shop", ("test",))
    assert last is not None and last.run == "20261206T040000Z-shop-test"
    (tmp_path / "junk.json").write_text("{")
    assert len(runs.list_runs(str(tmp_path))) == 2
    with pytest.raises(Exception, match="2 runs matching"):
        runs.load_run(str(tmp_path), "2026")


def test_run_book_and_measured_rto(tmp_path: Path) -> None:
    cfg = _cfg({"shop": {"vms": ["db"], "description": "The shop"}})
    plans = list(recovery.load_plans(cfg).values())
    assert hotsite.measured_rto("db", plans, str(tmp_path)) == (None, "estimated")
    runs.write(str(tmp_path), _report())
    rto, how = hotsite.measured_rto("db", plans, str(tmp_path))
    assert rto == 21.5 and how == "measured by test run 20261206T040000Z-shop-test"
    hs = hotsite.HotSite(plans, {"shop": runs.last_run(str(tmp_path), "shop", ("test",))})
    text = "\n".join(hotsite.markdown(hs))
    assert "### Recovery plan shop" in text and "The shop" in text
    assert "**Last test:** 2026-12-06T04:00:00+00:00 — passed" in text
    assert "`vmdr failover PLAN --planned`" in text


def test_a_replica_at_the_other_site_covers_the_levels_that_site_survives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from tests.unit.test_plan_estates import NOW, build_estate, evaluate
    from vmdr.plan import report

    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))
    cov = evaluate(build_estate("two-sites-one-city", tmp_path))
    mail = cov.vms["mail"]
    assert report.cell(mail.levels["building"]) == "XX"  # every copy is in building s1
    assert any("lacks required level building" in p for p in mail.problems)
    hs = hotsite.HotSite(replicas={"mail": hotsite.ReplicaFact(
        "mail", "hvn", "qemu+ssh://hvn/system", NOW - timedelta(minutes=10))})
    hotsite.apply(cov, hs, str(tmp_path / "reports"))
    b = mail.levels["building"]
    assert report.cell(b) == "OK" and b.rpo_s == 600 and b.rpo_met and b.rto_met
    assert b.replica == "replica at hvn (RTO estimated)" and b.rto_estimate_s == mail.boot_s
    assert report.cell(mail.levels["campus"]) == "ok"  # north campus survives too
    assert report.cell(mail.levels["city"]) == "--"  # Berlin holds both sites
    assert mail.levels["vm"].replica is not None  # fresher than the newest backup (2 h)
    assert not any("lacks required level" in p for p in mail.problems)
    assert cov.hotsite is hs


def test_a_passed_test_failover_is_a_boot_verification_with_a_measured_rto(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from tests.unit.test_plan_estates import NOW, build_estate, evaluate

    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))
    cov = evaluate(build_estate("two-sites-one-city", tmp_path))
    reports = tmp_path / "reports"
    rep = runs.RunReport("20261125T113000Z-mailplan-test", "mailplan", "test",
                         "2026-11-25T11:30:00+00:00", outcome="passed",
                         vms=[runs.VMOutcome("mail", "ready", 1, rto_s=42.0)])
    runs.write(str(reports), rep)
    plan = recovery.RecoveryPlan("mailplan", {"mail": recovery.PlanVM(
        "mail", "qemu+ssh://hvn/system", "hvn", "/r/mail", "mail-replica", None, None, ())},
        (recovery.GroupSpec(1, ("mail",)),))
    hs = hotsite.HotSite([plan], replicas={"mail": hotsite.ReplicaFact(
        "mail", "hvn", "qemu+ssh://hvn/system", NOW - timedelta(minutes=5))})
    hotsite.apply(cov, hs, str(reports))
    b = cov.vms["mail"].levels["building"]
    assert b.rto_estimate_s == 42.0
    assert b.replica == ("replica at hvn (RTO measured by test run "
                         "20261125T113000Z-mailplan-test)")
    assert b.last_verified == NOW - timedelta(minutes=30)
    assert cov.vms["mail"].last_verified == NOW - timedelta(minutes=30)
