"""The dashboard's /recovery page in headless chromium: the recovery plans of the config
with their groups, and the runs of each with their HTML reports (the agent serves them
from the reports directory). The runs here are report files as `vmdr failover` writes
them (through the same writer); the failovers themselves run in
tests/multihost/test_recovery_plans.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdr.plan import recovery_runs as runs

from .agent_services import running_agent
from .test_agent_live import _browser, free_port
from .vmtools import VMDR

pytestmark = [pytest.mark.chromium]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("recovery-web")
    port = free_port()
    reports = tmp / "reports"
    rep = runs.RunReport(
        "20261206T040000Z-shop-test", "shop", "test", "2026-12-06T04:00:00+00:00",
        finished="2026-12-06T04:00:41+00:00", duration_s=41.0, outcome="passed",
        dr_hosts=["qemu+ssh://dr1/system"],
        steps=[runs.Step("start", "2026-12-06T04:00:02+00:00", 0.4, vm="db")],
        vms=[runs.VMOutcome("db", "ready", 1, "rp-20261206T035500Z", None, 300.0, 17.5,
                            "agent", 12.1)])
    runs.write(str(reports), rep)
    cfg = tmp / "vmdr.toml"
    cfg.write_text(f"""
[agent]
listen = "127.0.0.1:{port}"
state = "{tmp}/agent.db"

[recovery]
reports = "{reports}"

[vm.db]
replica_to = "qemu:///system"

[recovery_plans.shop]
vms = ["db"]
description = "The shop's database"
ready = "tcp:5432"
""")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VMDR_CONFIG": str(cfg)}
    with running_agent(env, port, tmp / "agent.log", tries=150) as url:
        yield url, tmp, env


def test_recovery_page_shows_plans_runs_and_reports(
        agent: tuple[str, Path, dict[str, str]]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    url, tmp, env = agent
    p = subprocess.run([*VMDR, "agent", "user", "add", "aud", "--role", "auditor"],
                       input="a long enough password\n", text=True, env=env,
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    b = _browser()
    try:
        b.get(url + "/recovery")
        assert b.current_url.endswith("/login")
        b.find_element(By.ID, "user").send_keys("aud")
        b.find_element(By.ID, "password").send_keys("a long enough password")
        b.find_element(By.ID, "login").click()
        WebDriverWait(b, 60).until(lambda d: "Overview" in d.page_source)
        b.get(url + "/recovery")
        text = b.find_element(By.TAG_NAME, "main").text
        assert "shop" in text and "The shop's database" in text and "tcp:5432" in text
        assert "passed" in text and "RTO 17.5s" in text
        b.save_screenshot(str(tmp / "recovery.png"))
        b.find_element(By.LINK_TEXT, "2026-12-06T04:00:00+00:00").click()
        WebDriverWait(b, 30).until(lambda d: "Measured RTO" in d.page_source)
        assert "rp-20261206T035500Z" in b.page_source
        b.get(url + "/recovery/runs/..%2Fagent.db")
        assert "not found" in b.page_source.lower()  # never a file outside the reports
        b.get(url + "/recovery/runs/vmdr.toml")
        assert "not found" in b.page_source.lower()
    finally:
        b.quit()
