"""Discovery (with a fake hypervisor), the plan model, and its Markdown/HTML/PDF renderings."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.unit.test_plan_estates import GIB, NOW, build_estate, evaluate
from vmdr import config
from vmdr.errors import HypervisorUnavailable
from vmdr.hypervisor import DiskInfo, DomainInfo
from vmdr.plan import render_html, render_md, runbook


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))


class FakeHV:
    def __init__(self, domains: dict[str, tuple[int, int, int, str]]) -> None:
        self.domains = domains  # name -> (vcpus, memory GiB, disk GiB, state)

    def __enter__(self) -> FakeHV:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass

    def list_domains(self) -> list[str]:
        return sorted(self.domains)

    def domain(self, name: str) -> DomainInfo:
        vcpus, mem, disk, state = self.domains[name]
        return DomainInfo(name, "0" * 32, state, vcpus, mem * (1 << 20), "<domain/>",  # type: ignore[arg-type]
                          [DiskInfo("vda", "/x.qcow2", "file", "qcow2",
                                    virtual_size=disk * GIB)])


def connector(estate: dict[str, dict[str, tuple[int, int, int, str]] | None]) -> Any:
    def connect(uri: str) -> FakeHV:
        host = uri.split("//")[1].split("/")[0]
        doms = estate.get(host)
        if doms is None:
            raise HypervisorUnavailable(f"cannot connect to {uri}")
        return FakeHV(doms)
    return connect


def with_uris(cfg: config.Config) -> config.Config:
    p = Path(str(cfg.path))
    text = p.read_text().replace('[hosts.hv1]\n', '[hosts.hv1]\nuri = "test://hv1/system"\n')
    p.write_text(text.replace('[hosts.hv2]\n', '[hosts.hv2]\nuri = "test://hv2/system"\n'))
    return config.load(str(p))


def test_discovery_fills_in_and_is_cached(tmp_path: Path) -> None:
    cfg = with_uris(build_estate("two-racks", tmp_path))
    live = connector({"hv1": {"app": (6, 12, 30, "running"), "stray": (2, 4, 10, "stopped"),
                              "vmdr-verify-app-1a2b": (6, 12, 30, "running")},
                      "hv2": None})
    cov = evaluate(cfg, connector=live, use_cache=True)
    app = cov.vms["app"]
    assert (app.need.vcpus, app.need.memory, app.disk_bytes, app.state) == \
        (6, 12 * GIB, 30 * GIB, "running")
    assert app.facts_age_s == 0
    assert cov.vms["db"].need.vcpus == 4  # from its newest snapshot: hv2 did not answer
    assert not cov.hosts["hv2"].reachable and "cannot connect" in (cov.hosts["hv2"].error or "")
    assert not cov.vms["stray"].vm.declared
    assert "stray: found on hv1 but not in the inventory" in " ".join(cov.problems())
    assert "vmdr-verify-app-1a2b" not in cov.vms  # a verification boot, not the estate
    # a day later nobody answers: hv1 is described from the cache, stale with its age
    dead = connector({"hv1": None, "hv2": None})
    cov = evaluate(config.load(str(cfg.path)), now=NOW + timedelta(days=1), connector=dead,
                   use_cache=True)
    h = cov.hosts["hv1"]
    assert h.stale and h.read_at == NOW and cov.vms["app"].facts_age_s == 86400
    assert cov.vms["app"].need.vcpus == 6 and "stray" in cov.vms


def test_discovery_moves_a_vm_and_n_plus_one(tmp_path: Path) -> None:
    cfg = with_uris(build_estate("two-racks", tmp_path))
    live = connector({"hv1": {"app": (8, 100, 20, "running"), "db": (8, 60, 50, "running")},
                      "hv2": {}})
    cov = evaluate(cfg, connector=live)
    assert cov.vms["db"].host == "hv1"
    assert any("db runs on hv1, but the inventory says host = 'hv2'" in w
               for w in cov.inv.warnings)
    fail = {h.host: h for h in cov.n1}
    assert fail["hv1"].fits is False and "do not fit on the other hosts" in (
        fail["hv1"].problem or "")


def test_scenarios_and_commands(tmp_path: Path) -> None:
    cov = evaluate(build_estate("two-racks", tmp_path))
    plan = runbook.build(cov)
    titles = [s.title for s in plan.scenarios]
    assert titles[0] == "A single VM or application fails"
    assert "Host hv1 / rack R1 lost" in titles
    assert titles[-1] == "Datacenter DC1 / building B1 lost"  # B1 is also campus, city...
    host1 = next(s for s in plan.scenarios if s.title.startswith("Host hv1"))
    (step,) = host1.steps
    assert step.vm == "app" and step.target == "hv2" and step.copy is not None
    assert step.command == (
        f"vmdr restore app@{step.copy.snapshot[:12]} --repo {tmp_path}/backup --password-file "
        f"{tmp_path}/pass --target-dir /var/lib/libvirt/images --define --start --connect "
        "qemu+ssh://root@hv2/system")
    r2 = next(s for s in plan.scenarios if s.title == "Rack R2 lost")
    assert r2.problems == ["db: no copy survives (rack R2): nothing to restore from"]
    # boot order: db (group 1) before app (group 2, depends on db)
    s0 = plan.scenarios[0]
    assert [s.vm for s in s0.steps] == ["db", "app"]
    assert s0.steps[1].start_s >= s0.steps[0].up_s
    ids = {t.id: t for t in s0.tasks}
    assert ids["R2"].depends == ["T3.1", "R1"] and ids["T1"].owner == "Operations"


def test_markdown_follows_sp800_34(tmp_path: Path) -> None:
    plan = runbook.build(evaluate(build_estate("two-countries", tmp_path)))
    md = render_md.render(plan)
    heads = re.findall(r"^## \d\. (.*)$", md, re.M)
    assert heads == list(render_md.SECTIONS)
    assert "vmdr restore core@" in md and "--connect qemu+ssh://root@hvnl/system" in md
    assert "Retrieve the tapes of tape from vault iron" not in md  # tape is not needed
    assert "edge is not covered for a national disaster" in md
    assert "| core |" in md and "Next due" in md


def test_tape_retrieval_is_a_task(tmp_path: Path) -> None:
    cfg = build_estate("two-countries", tmp_path)
    (tmp_path / "nl-offsite").rename(tmp_path / "unreadable")  # only the tapes remain
    plan = runbook.build(evaluate(cfg))
    building = next(s for s in plan.scenarios if s.title == "Building Berlin DC lost")
    (step,) = building.steps
    assert step.copy is not None and step.copy.repo == "tape"
    assert step.retrieval_s == 4 * 3600 and step.target == "hvnl"
    # 4h courier + 20 GiB at 100 MiB/s + 30 s boot
    assert step.up_s == pytest.approx(4 * 3600 + 20 * GIB / (100 << 20) + 30)
    retrieve = next(t for t in building.tasks if "Retrieve the tapes" in t.title)
    assert retrieve.duration_s == 4 * 3600
    assert retrieve.id in next(t for t in building.tasks if t.id == "T3.1").depends


def test_html_is_self_contained(tmp_path: Path) -> None:
    plan = runbook.build(evaluate(build_estate("two-sites-one-city", tmp_path)))
    page = render_html.render(plan)
    assert page.startswith("<!DOCTYPE html>") and 'id="heatmap"' in page
    assert 'id="targets"' in page and "Copies by location" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "<script" not in page
    # the heatmap has one cell per VM and level, coloured by state
    assert page.count("<rect") >= 2 * 12
    assert render_html.COLOURS["!!"] in page and render_html.COLOURS["XX"] in page


def test_pdf(tmp_path: Path) -> None:
    pytest.importorskip("weasyprint", reason="WeasyPrint is not installed")
    from vmdr.plan import render_pdf
    plan = runbook.build(evaluate(build_estate("single-host", tmp_path)))
    pdf = render_pdf.render(plan)
    assert pdf.startswith(b"%PDF") and len(pdf) > 10_000


def test_html_shows_stale_coverage(tmp_path: Path) -> None:
    cfg = build_estate("two-racks", tmp_path)
    evaluate(cfg, use_cache=True)
    (tmp_path / "backup").rename(tmp_path / "gone")
    plan = runbook.build(evaluate(config.load(str(cfg.path)), now=NOW + timedelta(hours=2),
                                  use_cache=True))
    page = render_html.render(plan)
    assert "Based on incomplete information" in page
    assert "using copies cached 2h ago (stale)" in page
    assert page.count(f'fill="{render_html.COLOURS["stale"]}"') >= 6
