"""Watchdog settings from the inventory, and the ``vmdr watchdog`` command line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from vmdr.cli.main import main
from vmdr.config import parse
from vmdr.errors import ConfigError
from vmdr.ha import wdsettings
from vmdr.plan import inventory

BASE = """
[plan.tiers.gold]
rpo = "1h"
[plan.tiers.gold.watchdog]
interval = "5s"
hang_timeout = "20s"
[[plan.tiers.gold.watchdog.checks]]
name = "sshd"
process = "sshd"
"""


def settings(text: str, vm: str = "web") -> wdsettings.WatchdogSettings:
    cfg = parse(tomllib.loads(text), "t.toml")
    inv = inventory.from_config(cfg)
    wdsettings.parse_all(cfg, inv)
    return wdsettings.for_vm(cfg, inv, vm)


def test_defaults_are_the_documented_ones() -> None:
    s = settings("")
    assert (s.enabled, s.interval_s, s.hang_timeout_s, s.min_uptime_s) == (
        False, 10.0, 30.0, 120.0)
    assert (s.restart_budget, s.restart_window_s, s.on_budget_exhausted, s.action) == (
        3, 3600.0, "failover", "reset")
    assert s.app_interval_s == 30.0 and s.checks == ()


def test_ha_then_tier_then_vm() -> None:
    s = settings('[ha]\nvm_monitor_interval = "15s"\nvm_hang_timeout = "45s"\n'
                 'restart_budget = 5\non_budget_exhausted = "alert"\n' + BASE + """
[vm.web]
tier = "gold"
[vm.web.watchdog]
action = "restart"
[[vm.web.watchdog.checks]]
tcp = 8080
restart = "httpd -p 8080"
failures = 1
""")
    assert s.enabled and (s.interval_s, s.hang_timeout_s) == (5.0, 20.0)
    assert (s.restart_budget, s.on_budget_exhausted, s.action) == (5, "alert", "restart")
    assert [(c.name, c.kind, c.target, c.restart, c.failures) for c in s.checks] == [
        ("sshd", "process", "sshd", None, 2), ("tcp:8080", "tcp", "8080", "httpd -p 8080", 1)]
    other = settings('[ha]\nvm_monitor_interval = "15s"\nvm_hang_timeout = "45s"\n'
                     '[vm.db]\n', "db")
    assert not other.enabled and other.interval_s == 15.0


@pytest.mark.parametrize("text, key", [
    ('[vm.web.watchdog]\ninterval = "20s"\n', "vm.web.watchdog.interval"),
    ('[vm.web.watchdog]\nhang_timeout = "5s"\n', "vm.web.watchdog.hang_timeout"),
    ('[vm.web.watchdog]\naction = "reboot"\n', "vm.web.watchdog.action"),
    ('[vm.web.watchdog]\non_budget_exhausted = "pray"\n',
     "vm.web.watchdog.on_budget_exhausted"),
    ('[vm.web.watchdog]\nrestart_budget = -1\n', "vm.web.watchdog.restart_budget"),
    ('[vm.web.watchdog]\ninterval = "soon"\n', "vm.web.watchdog.interval"),
    ('[vm.web.watchdog]\nbogus = 1\n', "vm.web.watchdog.bogus"),
    ('[vm.web]\nwatchdog_interval = "5s"\n', "vm.web.watchdog_interval"),
    ('[[vm.web.watchdog.checks]]\ntcp = 80\nprocess = "x"\n', "vm.web.watchdog.checks[0].tcp"),
    ('[[vm.web.watchdog.checks]]\ntcp = 70000\n', "vm.web.watchdog.checks[0].tcp"),
    ('[[vm.web.watchdog.checks]]\ncommand = "true"\nfailures = 0\n',
     "vm.web.watchdog.checks[0].failures"),
    ('[[vm.web.watchdog.checks]]\ncommand = "true"\nretries = 1\n',
     "vm.web.watchdog.checks[0].retries"),
    ('[[vm.web.watchdog.checks]]\ncommand = "true"\ntimeout = "1m"\n',
     "vm.web.watchdog.checks"),
    ('[ha]\nvm_monitor_interval = "30s"\nvm_hang_timeout = "40s"\n', "ha.vm_hang_timeout"),
    ('[ha]\nrestart_budget = "many"\n', "ha.restart_budget"),
    ('[plan.tiers.gold.watchdog]\nmin_uptime = "0s"\n[vm.web]\ntier = "gold"\n',
     "plan.tiers.gold.watchdog.min_uptime"),
])
def test_bad_settings_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        settings(text)
    assert ei.value.message.startswith(f"t.toml: {key}: "), ei.value.message


def test_cli_help_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["watchdog", "--help"], ["watchdog", "run", "--help"],
                 ["watchdog", "check", "--help"]):
        with pytest.raises(SystemExit) as ei:
            main(args)
        assert ei.value.code == 0
    assert "hang_timeout" not in capsys.readouterr().err
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text('[vm.web.watchdog]\nhang_timeout = "5s"\n')
    assert main(["--config", str(cfg), "watchdog", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmdr: error: ") and \
        "vm.web.watchdog.hang_timeout" in err[0]
    cfg.write_text("")
    assert main(["--config", str(cfg), "watchdog", "run"]) == 2
    assert "no VM has a watchdog" in capsys.readouterr().err


def test_cli_check_and_run_on_libvirt_test_driver(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """libvirt's own test:/// driver: a real libvirt, a running domain without an agent."""
    pytest.importorskip("libvirt")
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text("")
    base = ["--config", str(cfg), "watchdog"]
    assert main([*base, "check", "test", "-c", "test:///default", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["state"] == "running" and rep["agent"] is False and not rep["ok"]
    assert rep["problems"] == ["guest agent does not answer"]
    assert main([*base, "check", "nosuch", "-c", "test:///default"]) == 11
    assert main([*base, "run", "--cycles", "1", "-c", "test:///default", "test",
                 "--evidence-dir", str(tmp_path)]) == 0
    # never answered since watched, so never judged hung: nothing to report
    assert capsys.readouterr().out.splitlines()[1:] == []


def test_vms_under_ha_are_watched_unless_switched_off() -> None:
    text = '[plan.tiers.gold]\nha = true\n[vm.web]\ntier = "gold"\n[vm.db]\ntier = "gold"\n' \
           '[vm.db.watchdog]\nenabled = false\n[vm.tmp]\n'
    assert settings(text, "web").enabled
    assert not settings(text, "db").enabled
    assert not settings(text, "tmp").enabled
