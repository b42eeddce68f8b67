"""The written DR plan for HA VMs without shared storage (``ha_storage = "local"``): at the
host level HA covers them with the RPO of their newest surviving copy (not 0), and the
host-failure scenario says HA restarts them from it instead of a manual restore."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from tests.unit.test_plan_estates import NOW, build_estate, evaluate
from vmdr import config
from vmdr.ha.planfacts import plan_facts
from vmdr.ha.records import FailoverRecord, HARecords, memory_records
from vmdr.plan import render_md, report, runbook
from vmdr.plan.coverage import Coverage
from vmdr.plan.inventory import Inventory


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))


def estate(tmp: Path, history: bool = True) -> config.Config:
    """two-racks with app (hv1) under HA on local disks, db (hv2) under HA on shared."""
    cfg = build_estate("two-racks", tmp, history=history)
    p = Path(cfg.path or "")
    text = p.read_text().replace("boot_group = 2\n", "boot_group = 2\nha = true\n"
                                 "ha_storage = \"local\"\n")
    p.write_text(text.replace("boot_group = 1", "boot_group = 1\nha = true"))
    return config.load(str(p))


def records() -> HARecords:
    r = memory_records(clock=lambda: NOW.timestamp())
    for h, vms in (("hv1", ["app"]), ("hv2", ["db"])):
        r.kv.put(f"/vmdr/members/{h}", json.dumps({"host": h, "cpus": 32,
                                                   "memory_mib": 131072,
                                                   "running_vms": vms}))
    t = (NOW - timedelta(days=1)).timestamp()
    r.set_test(FailoverRecord("app", t, "real", "hv1", "hv2", 3.0, 30.0))
    r.set_test(FailoverRecord("db", t, "test", "hv2", "hv1", 0.4, 7.5))
    return r


def covered(cfg: config.Config) -> Coverage:
    def ha(inv: Inventory):  # type: ignore[no-untyped-def]
        return plan_facts(inv, lambda: records())

    return evaluate(cfg, ha=ha)


def test_local_ha_vm_rpo_is_the_age_of_its_newest_copy(tmp_path: Path) -> None:
    cov = covered(estate(tmp_path))
    app, db = cov.vms["app"].levels["host"], cov.vms["db"].levels["host"]
    assert app.ha and app.covered and report.cell(app) == "HA"
    assert app.rpo_s == pytest.approx(3 * 3600)  # its newest backup is 3 h old
    assert db.ha and db.rpo_s == 0  # shared storage: nothing lost


def test_host_failure_scenario_says_ha_restarts_it_from_its_backup(tmp_path: Path) -> None:
    plan = runbook.build(covered(estate(tmp_path)))
    sc = next(s for s in plan.scenarios if s.blast.hosts == frozenset({"hv1"})
              and s.levels[0] == "host")
    (app,) = [s for s in sc.steps if s.vm == "app"]
    assert app.command is None and app.problem is None
    assert app.ha is not None and app.ha.startswith(
        "HA restarts it on a survivor from its newest backup (backup snapshot ")
    assert app.ha.endswith("by instant restore (RPO = the age of that restore point ≈ 3h "
                           "now)")
    md = "\n".join(render_md.render(plan).splitlines())
    assert f"- **app**: {app.ha}; owner Operations; up at ≈ " in md
    assert "vmdr restore app@" not in md.split("### S1.")[1].split("### S2.")[0]
    task = next(t for t in sc.tasks if t.title.startswith("Check that HA restarted app"))
    assert task.command is None
    # both hosts lost (the datacenter): no survivor for HA, the manual run book stays
    dc = next(s for s in plan.scenarios if s.blast.hosts == frozenset({"hv1", "hv2"}))
    (app_dc,) = [s for s in dc.steps if s.vm == "app"]
    assert app_dc.ha is None and app_dc.problem


def test_local_ha_vm_without_a_copy_is_not_covered(tmp_path: Path) -> None:
    cov = covered(estate(tmp_path, history=False))
    app = cov.vms["app"].levels["host"]
    assert not app.ha and not app.covered
    assert app.ha_gap == ('ha_storage = "local" and no copy of it survives the host: HA has '
                          "nothing to restart it from")
    assert "HA does not cover it" in (app.gap or "") or app.gap == app.ha_gap


def test_with_a_replica_on_a_survivor_the_run_book_names_it(tmp_path: Path) -> None:
    cfg = estate(tmp_path)
    p = Path(cfg.path or "")
    p.write_text(p.read_text().replace('ha_storage = "local"\n',
                                       'ha_storage = "local"\nreplica_to = "hv2"\n'))
    plan = runbook.build(covered(config.load(str(p))))
    sc = next(s for s in plan.scenarios if s.blast.hosts == frozenset({"hv1"}))
    (app,) = [s for s in sc.steps if s.vm == "app"]
    assert app.ha is not None and app.ha.startswith(
        "HA restarts it on a survivor from its replica on hv2 (else its newest backup "
        "(backup snapshot ")
    assert "instant restore" not in app.ha and "(RPO = the age of that restore point" \
        in app.ha
