"""``vmdr plan coverage | write | check`` as a sysadmin and a monitoring system see them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_plan_estates import NOW, build_estate
from vmdr.cli.main import main
from vmdr.timeutil import format_time

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "estate.toml"
AT = ["--now", format_time(NOW)]


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMDR_CONFIG", raising=False)
    monkeypatch.delenv("VMDR_PASSWORD", raising=False)


def run(args: list[str], capsys: pytest.CaptureFixture[str], code: int = 0) -> str:
    rc = main(args)
    cap = capsys.readouterr()
    assert rc == code, cap.out + cap.err
    assert "Traceback" not in cap.err
    return cap.out if code == 0 or cap.out else cap.err


def test_coverage_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("two-racks", tmp_path)
    doc = json.loads(run(["--config", str(cfg.path), "plan", "coverage", "--json", *AT], capsys))
    assert doc["vms"]["db"]["levels"]["rack"]["covered"] is False
    assert doc["vms"]["app"]["levels"]["rack"]["covered"] is True
    assert doc["vms"]["app"]["levels"]["host"]["rpo_s"] == 3 * 3600
    assert doc["sources"]["repositories"]["backup"]["reachable"] is True


def test_coverage_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("single-host", tmp_path)
    out = run(["--config", str(cfg.path), "plan", "coverage", *AT], capsys)
    assert "web01" in out and "XX" in out
    assert "hv1 is the only host" in out


def test_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("two-racks", tmp_path)
    out = run(["--config", str(cfg.path), "plan", "check", *AT], capsys, code=1)
    assert out.splitlines() == [
        "db: lacks required level rack: db is not covered for a rack disaster: every copy is "
        "in rack R2 (backup); add a `vmdr copy` to a repository outside R2 (declare one in "
        "[repositories])."]
    # 40 days later every VM misses its RPO and its verification policy
    out = run(["--config", str(cfg.path), "plan", "check", "--now", "2027-01-04T12:00:00Z"],
              capsys, code=1)
    assert "app: misses RPO for a host failure: newest copy is 40d3h old, target 24h" in out
    assert "app: last successful boot verification is 40d2h old (policy: younger than 30d)" \
        in out
    doc = json.loads(run(["--config", str(cfg.path), "plan", "check", "--json", *AT], capsys,
                         code=1))
    assert doc["ok"] is False and len(doc["problems"]) == 1


def test_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("two-racks", tmp_path)
    text = Path(str(cfg.path)).read_text().replace(
        'must_survive = ["vm", "host", "rack"]\nboot_group = 1',
        'must_survive = ["vm", "host"]\nboot_group = 1')
    Path(str(cfg.path)).write_text(text)
    out = run(["--config", str(cfg.path), "plan", "check", *AT], capsys)
    assert out.strip() == "ok: 2 VMs meet their targets and verification policy"
    out = run(["--config", str(cfg.path), "plan", "check", "--strict", *AT], capsys, code=1)
    assert "3-2-1-1-0 not met" in out


def test_write_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("two-countries", tmp_path)
    md = run(["--config", str(cfg.path), "plan", "write", *AT], capsys)
    assert md.startswith("# Disaster recovery")
    run(["--config", str(cfg.path), "plan", "write", "-o", str(tmp_path / "p.html"), *AT],
        capsys)
    assert (tmp_path / "p.html").read_text().startswith("<!DOCTYPE html>")
    out = run(["--config", str(cfg.path), "--json", "plan", "write", "--format", "md", "-o",
               str(tmp_path / "p.md"), *AT], capsys)
    assert json.loads(out)["format"] == "md"


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = build_estate("two-racks", tmp_path, history=False)
    p = Path(str(cfg.path))
    p.write_text(p.read_text().replace('location = "r1"\nvcpus', 'location = "r9"\nvcpus'))
    err = run(["--config", str(p), "plan", "coverage"], capsys, code=2)
    assert err.strip() == f"vmdr: error: {p}: hosts.hv1.location: unknown location 'r9'"
    err = run(["--config", str(p), "plan", "write", "--format", "pdf"], capsys, code=2)
    assert "--format pdf needs -o FILE" in err
    err = run(["--config", str(p), "plan", "check", "--now", "yesterday"], capsys, code=2)
    assert "--now: invalid time" in err


def test_empty_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "empty.toml"
    p.write_text('repository = "/srv/x"\n')
    err = run(["--config", str(p), "plan", "coverage"], capsys, code=2)
    assert "the inventory is empty" in err


def test_example_estate_works_anywhere(tmp_path: Path) -> None:
    """Nothing in the example is reachable here: output is still produced, and says so."""
    env = dict(os.environ, VMDR_CACHE_DIR=str(tmp_path / "cache"))
    base = [sys.executable, "-m", "vmdr.cli.main", "--config", str(EXAMPLE), "plan"]
    for args in (["coverage", "--offline", "--timeout", "15"],
                 ["write", "--offline", "--timeout", "15", "-o", str(tmp_path / "plan.html")]):
        p = subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
    p = subprocess.run([*base, "coverage", "--offline", "--timeout", "15"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "NO COPIES KNOWN" in p.stdout
    html = (tmp_path / "plan.html").read_text()
    assert "Based on incomplete information" in html and 'id="heatmap"' in html
    p = subprocess.run([*base, "check", "--offline", "--timeout", "15"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 1 and "repository local: unreachable" in p.stdout


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("coverage", "write", "check"):
        with pytest.raises(SystemExit) as ei:
            main(["plan", sub, "--help"])
        assert ei.value.code == 0
        assert "--offline" in capsys.readouterr().out
