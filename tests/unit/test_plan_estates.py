"""Fixture estates (tests/fixtures/estates/*.toml) with snapshot histories written through
the real repository, each with its known coverage. Other test_plan_* modules import
``build_estate`` and ``evaluate`` from here."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.repofixtures import PASS, FakeClock, make_repo, reopen
from vmdr import config
from vmdr.jobs import plan as planjob
from vmdr.plan import report, taxonomy
from vmdr.plan.coverage import Coverage
from vmdr.plan.inventory import RepoDecl
from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot, chunk_count
from vmdr.repository.repo import Repository

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "estates"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CHUNK = 64 << 20
GIB = 1 << 30

# repo -> [(vm, age in hours, size GiB, [(verification age h, status, heartbeat s,
#                                          restore s, restored bytes)])]
V = list[tuple[float, str, float, float | None, int | None]]
HISTORY: dict[str, dict[str, list[tuple[str, float, int, V]]]] = {
    "single-host": {"local": [
        ("web01", 30, 20, []),
        ("web01", 6, 20, [(5, "failed", 0.0, None, None)]),
        ("db01", 2, 10, [(1, "passed", 20.0, 40.0, 10 * GIB)]),
    ]},
    "two-racks": {"backup": [
        ("app", 3, 20, [(2, "passed", 30.0, 100.0, 20 * GIB)]),
        ("db", 27, 50, []),
        ("db", 3, 50, [(2.5, "passed", 45.0, None, None)]),
    ]},
    "two-sites-one-city": {
        "repo-n": [("erp", 1, 40, [(0.5, "passed", 25.0, None, None)])],
        "repo-s": [("erp", 25, 40, []), ("mail", 2, 30, [(1, "passed", 15.0, None, None)])],
    },
    "two-countries": {
        "de-local": [("core", 50, 20, [(48, "passed", 30.0, None, None)]), ("core", 2, 20, [])],
        "nl-offsite": [("core", 10, 20, []), ("edge", 5, 8, [(4, "passed", 12.0, None, None)])],
        "tape": [("core", 72, 20, [])],
    },
}

# The cell of every VM for every level, in taxonomy order:
# app vm host net rack dc bldg camp city reg ctry multi
EXPECTED: dict[str, dict[str, str]] = {
    "single-host": {
        "db01": "ok OK XX -- -- -- -- -- -- -- -- --",
        "web01": "ok OK XX -- -- -- -- -- -- -- -- --",
    },
    "two-racks": {
        "app": "ok OK OK ok OK -- -- -- -- -- -- --",
        "db": "ok OK OK ok XX -- -- -- -- -- -- --",
    },
    "two-sites-one-city": {
        "erp": "ok OK OK ok ok ok !! !! -- -- -- --",
        "mail": "ok OK ok ok ok ok XX -- -- -- -- --",
    },
    "two-countries": {
        "core": "ok OK OK ok ok ok OK ok ok ok OK --",
        "edge": "ok OK OK ok ok ok -- -- -- -- XX --",
    },
}


def write_snapshot(repo: Repository, vm: str, t: datetime, size: int, vcpus: int = 4,
                   memory_kib: int = 8 << 20) -> str:
    disk = DiskRecord("vda", size, ChunkList.holes(chunk_count(size, repo.chunk_size)), "qcow2")
    snap = Snapshot(vm, t, repo.chunk_size, [disk], host="hv-test",
                    meta={"kind": "vm", "config": {"vcpus": vcpus, "memory_kib": memory_kib}},
                    stats={"bytes_read": size // 2})
    return repo.save_snapshot(snap)


def build_estate(name: str, tmp: Path, history: bool = True) -> config.Config:
    """Write the estate's config (``$TMP`` → *tmp*) and its repositories; load the config."""
    pw = tmp / "pass"
    pw.write_text(PASS + "\n")
    pw.chmod(0o600)
    text = (FIXTURES / f"{name}.toml").read_text().replace("$TMP", str(tmp))
    path = tmp / f"{name}.toml"
    path.write_text(text)
    for repo_name, snaps in (HISTORY[name] if history else {}).items():
        clock = FakeClock(NOW - timedelta(days=60))
        repo = make_repo(str(tmp / repo_name), chunk_size=CHUNK, clock=clock)
        for vm, age_h, size_gib, verifs in snaps:
            sid = write_snapshot(repo, vm, NOW - timedelta(hours=age_h), size_gib * GIB)
            for v_age, status, beat, restore_s, nbytes in verifs:
                clock.now = NOW - timedelta(hours=v_age)
                doc: dict[str, Any] = {"kind": "verification", "status": status,
                                       "heartbeat_s": beat}
                if restore_s:
                    doc.update(restore_s=restore_s, bytes_written=nbytes)
                repo.add_attachment(sid, doc)
        repo.close()
    return config.load(str(path))


def opener(decl: RepoDecl) -> Repository:
    return reopen(decl.url)


def evaluate(cfg: config.Config, now: datetime = NOW, **kw: Any) -> Coverage:
    kw.setdefault("use_cache", False)
    return planjob.evaluate(cfg, opener=kw.pop("opener", opener),
                            connector=kw.pop("connector", None), now=now,
                            timeout=kw.pop("timeout", 30.0), **kw)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))


def matrix(cov: Coverage) -> dict[str, str]:
    return {n: " ".join(report.cell(vc.levels[k]) for k in taxonomy.LEVEL_KEYS)
            for n, vc in cov.vms.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_expected_coverage(name: str, tmp_path: Path) -> None:
    cov = evaluate(build_estate(name, tmp_path))
    assert matrix(cov) == EXPECTED[name]
    assert all(r.reachable for r in cov.repos.values())


def test_fixture_files_match_expectations() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.toml")) == sorted(EXPECTED)


def test_single_host(tmp_path: Path) -> None:
    cov = evaluate(build_estate("single-host", tmp_path))
    web = cov.vms["web01"]
    assert web.levels["vm"].rpo_s == 6 * 3600
    # 20 GiB at the measured 256 MiB/s (db01's restore: 10 GiB in 40 s) + default boot 60 s
    assert web.levels["vm"].rto_estimate_s == pytest.approx(20 * GIB / (10 * GIB / 40) + 60)
    gap = web.levels["host"].gap
    assert gap is not None and "every copy is in host hv1" in gap and "`vmdr copy`" in gap
    assert [h.fits for h in cov.n1] == [False]
    assert "hv1 is the only host" in (cov.n1[0].problem or "")
    problems = cov.problems()
    assert any(p.startswith("web01: lacks required level host") for p in problems)
    assert any(p.startswith("db01: lacks required level host") for p in problems)
    assert "web01: no successful boot verification on record (policy: younger than 7d): " \
        "run `vmdr verify --boot web01`" in problems
    assert not any(p.startswith("db01: no successful") for p in problems)
    assert cov.vms["web01"].rule.errors == 1  # the failed verification


def test_two_racks(tmp_path: Path) -> None:
    cov = evaluate(build_estate("two-racks", tmp_path))
    gap = cov.vms["db"].levels["rack"].gap
    assert gap == ("db is not covered for a rack disaster: every copy is in rack R2 (backup); "
                   "add a `vmdr copy` to a repository outside R2 (declare one in "
                   "[repositories]).")
    assert cov.vms["app"].levels["rack"].covered
    assert cov.throughput["backup"][1] == "measured (1 restores)"
    assert [(h.host, h.fits) for h in cov.n1] == [("hv1", True), ("hv2", True)]
    assert cov.problems() == [gap and f"db: lacks required level rack: {gap}"]


def test_two_sites_rpo_missed_outside_the_building(tmp_path: Path) -> None:
    cov = evaluate(build_estate("two-sites-one-city", tmp_path))
    erp = cov.vms["erp"].levels["building"]
    assert erp.covered and erp.rpo_s == 25 * 3600 and erp.rpo_met is False
    assert erp.gap is not None and "misses its RPO" in erp.gap
    assert (f"erp: misses RPO for a building disaster: newest copy is 25h old, target 12h; "
            f"run `vmdr copy erp --latest 1 --repo {tmp_path}/repo-n --to {tmp_path}/repo-s` "
            "at least every 12h") in cov.problems()
    assert cov.vms["erp"].levels["vm"].rpo_s == 3600


def test_two_countries(tmp_path: Path) -> None:
    cov = evaluate(build_estate("two-countries", tmp_path))
    core = cov.vms["core"]
    assert core.rule.ok, core.rule.missing()
    country = core.levels["country"]
    assert country.chosen is not None and country.chosen.repo == "nl-offsite"
    assert country.rto_estimate_s == pytest.approx(20 * GIB / (50 << 20) + 30.0)
    assert country.last_verified is None  # only the German copy was boot-verified
    assert core.levels["vm"].last_verified == NOW - timedelta(hours=48)
    city = core.levels["city"]
    assert [c.repo for c in city.copies] == ["nl-offsite"]  # the tape vault is in Berlin
    assert not cov.vms["edge"].rule.ok
    assert cov.problems() == [
        "edge: lacks required level country: " + (cov.vms["edge"].levels["country"].gap or "")]


def test_json_shape(tmp_path: Path) -> None:
    doc = report.to_json(evaluate(build_estate("two-racks", tmp_path)))
    lv = doc["vms"]["db"]["levels"]["rack"]
    assert set(lv) >= {"covered", "copies", "rpo_s", "rto_estimate_s", "last_verified", "gap"}
    assert lv["covered"] is False and lv["gap"]
    ok = doc["vms"]["app"]["levels"]["rack"]
    assert ok["copies"][0]["repo"] == "backup" and ok["copies"][0]["snapshots"] == 1
    assert ok["rpo_s"] == 3 * 3600 and ok["gap"] is None
    assert ok["last_verified"] == "2026-11-25T10:00:00.000000Z"
    assert [lvl["key"] for lvl in doc["levels"]] == list(taxonomy.LEVEL_KEYS)


def test_unreachable_repository_uses_cache_marked_stale(tmp_path: Path) -> None:
    cfg = build_estate("two-racks", tmp_path)
    first = evaluate(cfg, use_cache=True)
    assert first.vms["app"].levels["rack"].covered
    os.rename(tmp_path / "backup", tmp_path / "gone")
    later = NOW + timedelta(hours=5)
    cov = evaluate(config.load(cfg.path), now=later, use_cache=True)
    st = cov.repos["backup"]
    assert not st.reachable and st.stale and st.read_at == NOW
    lc = cov.vms["app"].levels["rack"]
    assert lc.covered and lc.stale and lc.rpo_s == 8 * 3600
    line = [ln for ln in report.source_lines(cov) if ln.startswith("repository backup")]
    assert line and "not readable" in line[0]
    assert "using copies cached 5h ago (stale)" in line[0]


def test_unreachable_repository_without_cache(tmp_path: Path) -> None:
    cfg = build_estate("two-racks", tmp_path, history=False)
    cov = evaluate(cfg)
    assert not cov.repos["backup"].reachable
    assert report.cell(cov.vms["app"].levels["vm"]) == "??"
    gap = cov.vms["app"].levels["vm"].gap or ""
    assert "no known copy" in gap and "none could be read: backup" in gap
    assert any(p.startswith("repository backup: unreachable") for p in cov.problems())


def test_only_boot_verifications_count(tmp_path: Path) -> None:
    cfg = build_estate("single-host", tmp_path)
    clock = FakeClock(NOW - timedelta(minutes=30))
    repo = reopen(str(tmp_path / "local"), clock)
    newest = repo.list_snapshots("web01")[-1]
    # what `vmdr verify` writes without --boot: data checked, no test boot
    repo.add_attachment(newest.id, {"kind": "verification", "status": "passed", "boot": False,
                                    "checks": [], "heartbeat_s": None})
    repo.close()
    cov = evaluate(config.load(str(cfg.path)))
    assert cov.vms["web01"].last_verified is None
    assert cov.vms["web01"].rule.errors == 0 and cov.vms["web01"].rule.verified
    repo = reopen(str(tmp_path / "local"), clock)
    repo.add_attachment(newest.id, {"kind": "verification", "status": "passed", "boot": True,
                                    "heartbeat_s": 12.5, "verify_ports": []})
    repo.close()
    cov = evaluate(config.load(str(cfg.path)))
    assert cov.vms["web01"].last_verified == NOW - timedelta(minutes=30)
    assert cov.vms["web01"].boot_s == 12.5
    assert not any(p.startswith("web01: no successful") for p in cov.problems())


def test_other_modules_vm_keys_are_not_warned_about(tmp_path: Path) -> None:
    cfg = build_estate("single-host", tmp_path, history=False)
    p = Path(str(cfg.path))
    p.write_text(p.read_text().replace('[vm.db01]\n', '[vm.db01]\nverify_ports = [22]\n'))
    assert evaluate(config.load(str(p))).inv.warnings == []


def build_example(tmp: Path) -> config.Config:
    """examples/estate.toml with its four repositories made real under *tmp*."""
    text = (FIXTURES.parents[2] / "examples" / "estate.toml").read_text()
    for name in ("local", "hq2-vault", "s3-offsite", "tape"):
        text = re.sub(rf'(\[repositories\.{name}\]\nurl = )"[^"]*"', rf'\1"{tmp}/{name}"', text)
    text = text.replace('password_file = "/etc/vmdr/passphrase"', f'password_file = "{tmp}/pass"')
    (tmp / "estate.toml").write_text(text)
    (tmp / "pass").write_text(PASS + "\n")
    (tmp / "pass").chmod(0o600)
    sizes = {"db01": 200, "app01": 40, "web01": 20, "web02": 20, "mail01": 120, "dns01": 8}
    snaps = {"local": [(vm, h) for vm in sizes for h in (26, 2)],
             "hq2-vault": [(vm, 6) for vm in sizes if vm != "dns01"],
             "s3-offsite": [(vm, 30) for vm in ("db01", "app01", "mail01")],
             "tape": [(vm, 24 * 5) for vm in sizes]}
    for repo_name, items in snaps.items():
        clock = FakeClock(NOW - timedelta(days=30))
        repo = make_repo(str(tmp / repo_name), chunk_size=CHUNK, clock=clock)
        for vm, h in items:
            sid = write_snapshot(repo, vm, NOW - timedelta(hours=h), sizes[vm] * GIB)
            if repo_name == "local" and h == 26 and vm != "mail01":
                clock.now = NOW - timedelta(hours=20)
                repo.add_attachment(sid, {"kind": "verification", "status": "passed",
                                          "boot": True, "heartbeat_s": 35.0,
                                          "restore_s": 300.0, "bytes_written": 60 * GIB})
        repo.close()
    return config.load(str(tmp / "estate.toml"))


def test_example_estate_with_real_repositories(tmp_path: Path) -> None:
    cov = evaluate(build_example(tmp_path))
    assert matrix(cov) == {
        "app01": "OK OK OK ok !! ok !! ok ok ok ok --",
        "db01": "OK OK OK ok OK ok !! ok ok ok ok --",
        "dns01": "ok OK OK ok ok ok ok ok ok ok OK --",
        "mail01": "ok OK OK ok ok ok OK ok ok ok ok --",
        "web01": "ok OK OK ok ok ok OK ok -- -- -- --",
        "web02": "ok OK OK ok ok ok OK ok -- -- -- --",
    }
    assert [vc.vm.name for vc in cov.vms.values() if not vc.rule.ok] == ["mail01"]
    assert all(h.fits for h in cov.n1)
    # 60 GiB in 300 s, measured by the verification restores
    assert cov.throughput["local"] == (60 * GIB / 300, "measured (5 restores)")
    assert "mail01: no successful boot verification on record (policy: younger than 14d): " \
        "run `vmdr verify --boot mail01`" in cov.problems()
