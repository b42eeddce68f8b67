"""The DR plan's host-level HA rule: covered by HA only when HA is enabled, admission
control holds and a failover passed within the plan's test_interval; N+1 from the agents
in etcd when it answers, else the inventory's figures (saying so)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmdr import config
from vmdr.ha.planfacts import plan_facts
from vmdr.ha.records import FailoverRecord, HARecords, memory_records
from vmdr.jobs import plan as planjob
from vmdr.plan import report
from vmdr.plan.coverage import Coverage
from vmdr.plan.inventory import Inventory

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ESTATE = """
[plan]
test_interval = "30d"
boot_time = "1m"
[locations.b1]
kind = "building"
[hosts.hv1]
location = "b1"
vcpus = 4
memory = "8GiB"
[hosts.hv2]
location = "b1"
vcpus = 4
memory = "8GiB"
[vm.web]
host = "hv1"
ha = true
vcpus = 2
memory = "2GiB"
rto = "10m"
must_survive = ["vm", "host"]
[vm.db]
host = "hv2"
vcpus = 2
memory = "2GiB"
must_survive = ["vm", "host"]
"""


def cfg(tmp_path: Path, extra: str = "") -> config.Config:
    p = tmp_path / "estate.toml"
    p.write_text(ESTATE + extra)
    return config.load(str(p))


def records(*, tested_days_ago: float | None = 1.0) -> HARecords:
    r = memory_records(clock=lambda: NOW.timestamp())
    for h, vms in (("hv1", ["web"]), ("hv2", ["db"])):
        r.kv.put(f"/vmdr/members/{h}", json.dumps({"host": h, "cpus": 4, "memory_mib": 8192,
                                                   "running_vms": vms}))
    if tested_days_ago is not None:
        t = (NOW - timedelta(days=tested_days_ago)).timestamp()
        r.set_test(FailoverRecord("web", t, "test", "hv1", "hv2", 0.4, 7.5))
    return r


def evaluate(c: config.Config, rec: HARecords | None, raise_: bool = False) -> Coverage:
    def opener() -> HARecords | None:
        if raise_:
            raise ConnectionError("connection refused")
        return rec

    def ha(inv: Inventory):  # type: ignore[no-untyped-def]
        return plan_facts(inv, opener)

    return planjob.evaluate(c, opener=lambda d: None, connector=None,  # type: ignore[arg-type,return-value]
                            now=NOW, use_cache=False, ha=ha)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))


def test_tested_admitted_ha_vm_is_covered_at_host_level(tmp_path: Path) -> None:
    cov = evaluate(cfg(tmp_path), records())
    host = cov.vms["web"].levels["host"]
    assert host.ha and host.covered and report.cell(host) == "HA" and host.gap is None
    assert host.rpo_s == 0 and host.rto_met is True  # 7.5 s + the restart decision
    assert report.cell(cov.vms["db"].levels["host"]) == "XX"  # no HA, no copy
    doc = report.to_json(cov)
    assert doc["ha"]["vms"]["web"]["covered"] and doc["ha"]["source"] == "etcd (2 live agents)"
    assert doc["n_plus_1_source"] == "live data: etcd (2 live agents)"
    assert [(h["host"], h["fits"]) for h in doc["n_plus_1"]] == [("hv1", True), ("hv2", True)]
    text = "\n".join(report.to_text(cov))
    assert "  - web: covered by HA (last test " in text
    assert "N+1 hosts (from live data: etcd (2 live agents)):" in text


def test_each_failing_condition_is_named(tmp_path: Path) -> None:
    host = evaluate(cfg(tmp_path), records(tested_days_ago=None)).vms["web"].levels["host"]
    assert not host.ha and "no passed failover test of web on record" in (host.ha_gap or "")
    assert "vmdr ha test web" in (host.gap or "")
    host = evaluate(cfg(tmp_path), records(tested_days_ago=40)).vms["web"].levels["host"]
    assert "is 40d old (test_interval 30d)" in (host.ha_gap or "")
    # admission: host_failures_tolerated = 2 cannot hold on two hosts
    c = cfg(tmp_path, "[ha]\nhost_failures_tolerated = 2\n")
    host = evaluate(c, records()).vms["web"].levels["host"]
    assert (host.ha_gap or "").startswith("admission control fails for web")
    # no etcd: not proven, N+1 from the inventory, saying so
    cov = evaluate(cfg(tmp_path), None)
    host = cov.vms["web"].levels["host"]
    assert not host.ha and "no [agent] etcd configured" in (host.ha_gap or "")
    assert cov.n1_source == "inventory figures (no [agent] etcd configured)"
    cov = evaluate(cfg(tmp_path), records(), raise_=True)
    assert "etcd not reachable: connection refused" in (cov.vms["web"].levels["host"].ha_gap
                                                       or "")


def test_live_n1_counts_maintenance(tmp_path: Path) -> None:
    r = records()
    r.set_maintenance("hv2", "firmware")
    cov = evaluate(cfg(tmp_path), r)
    fails = {h.host: h for h in cov.n1}
    assert fails["hv1"].fits is False and "web" in (fails["hv1"].problem or "")


def test_written_plan_renders_ha_cells(tmp_path: Path) -> None:
    from vmdr.plan import render_html, render_md, runbook
    plan = runbook.build(evaluate(cfg(tmp_path), records()))
    html = render_html.render(plan)
    assert "covered by HA (enabled, admitted, failover-tested)" in html
    md = render_md.render(plan)
    assert "| web | -- | XX | HA | -- |" in md  # app, vm, host, net
