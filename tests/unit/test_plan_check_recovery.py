"""``vmdr plan check`` includes the recovery plans: static problems offline, the sites'
(networks, capacity, replica age) online; one line per problem naming the plan."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_plan_estates import NOW, build_estate
from vmdr import config as configmod
from vmdr.cli.main import main
from vmdr.jobs import recovery_check as rc
from vmdr.plan import inventory as invmod
from vmdr.plan.recovery import RecoveryPlan
from vmdr.timeutil import format_time

AT = ["--now", format_time(NOW)]
BASE: dict[str, Any] = {
    "hosts": {"dr1": {"location": "dc2", "uri": "qemu+ssh://root@dr1/system",
                      "target_dir": "/srv/images"}},
    "locations": {"dc2": {"kind": "building", "name": "DC 2"}},
    "vm": {"db": {"boot_group": 1, "replica_to": "dr1"},
           "app": {"boot_group": 2, "depends_on": ["db"], "replica_to": "dr1"}},
}


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMDR_CONFIG", raising=False)
    monkeypatch.delenv("VMDR_CONNECT", raising=False)


def _cfg(plans: dict[str, Any]) -> configmod.Config:
    return configmod.parse({**BASE, "recovery_plans": plans}, "estate.toml")


def test_offline_one_line_per_broken_plan_and_the_good_ones_are_kept() -> None:
    cfg = _cfg({
        "good": {"vms": ["db", "app"]},
        "nope": {"vms": ["db", "ghost"]},
        "half": {"vms": ["app"]},
        "leaky": {"vms": ["db"], "network_map": {"lan": "dr-lan"},
                  "test_network_map": {"lan": "dr-lan"}},
        "twice": {"vms": ["db"], "reip_rules": [
            {"from": "10.0.0.0/16", "to": "10.9.0.0/16"},
            {"from": "10.0.1.0/24", "to": "10.8.1.0/24"}]},
    })
    res = rc.plan_problems(cfg, "qemu:///system", offline=True)
    assert len(res.problems) == 4, res.problems
    by = {p.split(":", 1)[0]: p for p in res.problems}
    assert "recovery_plans.nope.vms: unknown VM 'ghost'" in by["recovery plan nope"]
    assert "app depends on db, which is not in the plan" in by["recovery plan half"]
    assert by["recovery plan leaky"] == (
        "recovery plan leaky: network lan: the test network dr-lan is its DR network: a "
        "test failover would not be isolated")
    assert by["recovery plan twice"] == (
        "recovery plan twice: re-IP rules 10.0.0.0/16 and 10.0.1.0/24 overlap (the first "
        "one wins)")
    assert all("\n" not in p for p in res.problems)
    # the rest of `plan check` goes on with the plans that parse
    assert sorted(res.config.raw["recovery_plans"]) == ["good", "leaky", "twice"]
    assert sorted(cfg.raw["recovery_plans"]) == ["good", "half", "leaky", "nope", "twice"]


def test_no_recovery_plans_nothing_to_say() -> None:
    cfg = configmod.parse(BASE, "estate.toml")
    res = rc.plan_problems(cfg, "qemu:///system", offline=False)
    assert res.problems == [] and res.config is cfg


def test_online_adds_the_sites_errors_not_their_warnings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []

    def fake_check(plan: RecoveryPlan, inv: invmod.Inventory, source_uri: str,
                   now: datetime | None = None) -> rc.PlanCheck:
        seen.append((plan.name, source_uri == "qemu+ssh://src/system"))
        return rc.PlanCheck(plan.name, len(plan.vms), [
            rc.Finding(plan.name, "error", "network",
                       "the plan's DR network: network 'dr-lan' does not exist on the DR "
                       "host qemu+ssh://root@dr1/system", "db"),
            rc.Finding(plan.name, "error", "capacity",
                       "the plan needs 8192 MiB of memory at dr1, which has 4096 MiB"),
            rc.Finding(plan.name, "warning", "source", "source host unreachable"),
        ], {})

    monkeypatch.setattr(rc, "check_plan", fake_check)
    cfg = _cfg({"app": {"vms": ["db", "app"]}})
    assert rc.plan_problems(cfg, "qemu+ssh://src/system", offline=True).problems == []
    assert seen == []  # offline: no site is asked
    res = rc.plan_problems(cfg, "qemu+ssh://src/system", offline=False)
    assert seen == [("app", True)]
    assert res.problems == [
        "recovery plan app: db: the plan's DR network: network 'dr-lan' does not exist on "
        "the DR host qemu+ssh://root@dr1/system",
        "recovery plan app: the plan needs 8192 MiB of memory at dr1, which has 4096 MiB"]


def test_plan_check_cli_names_the_broken_plan_and_keeps_checking_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("two-racks", tmp_path)
    path = Path(str(cfg.path))
    path.write_text(path.read_text() + f"""
[hosts.dr]
location = "b1"
uri = "qemu:///system"
target_dir = "{tmp_path / 'dr'}"

[replicas]
to = "dr"
vms = ["db", "app"]

[recovery_plans.shop]
vms = ["db", "app"]
network_map = {{ lan = "dr-lan" }}
test_network_map = {{ lan = "dr-lan" }}

[recovery_plans.typo]
vms = ["db", "app", "web"]
""")
    rc_ = main(["--config", str(path), "plan", "check", "--offline", *AT])
    cap = capsys.readouterr()
    assert rc_ == 1, cap.out + cap.err
    assert "Traceback" not in cap.err
    lines = cap.out.splitlines()
    assert "recovery plan shop: network lan: the test network dr-lan is its DR network: a " \
           "test failover would not be isolated" in lines
    assert any(ln.startswith("recovery plan typo: ") and "unknown VM 'web'" in ln
               for ln in lines), lines
    # the coverage problems are still reported beside them
    assert any(ln.startswith("db: ") for ln in lines), lines
    rc_ = main(["--config", str(path), "plan", "check", "--offline", "--json", *AT])
    import json

    doc = json.loads(capsys.readouterr().out)
    assert rc_ == 1 and not doc["ok"]
    assert sum(p.startswith("recovery plan ") for p in doc["problems"]) == 2


def test_offline_reads_no_replica_state_at_the_dr_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--offline`` contacts no host: the replicas count as unknown, with a note."""
    from vmdr.jobs import plan as planjob
    from vmdr.jobs import replicate_site

    def no_site(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a DR host was contacted --offline")

    monkeypatch.setattr(replicate_site, "Site", no_site)
    cfg = _cfg({"good": {"vms": ["db", "app"]}})
    inv = invmod.from_config(cfg)
    hs = planjob.hotsite_facts(cfg, inv, 5.0, offline=True)
    assert hs is not None and sorted(hs.replicas) == ["app", "db"]
    assert all(f.newest is None and f.error == "not read (--offline)" and f.dr_host == "dr1"
               for f in hs.replicas.values())
    assert any("--offline" in n for n in hs.notes)
