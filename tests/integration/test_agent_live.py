"""The agent on one host, for real: a minutely policy backs up a running guest by itself;
`vmdr jobs`, /metrics and the dashboard in headless chromium (selenium + Debian's
chromium-driver) show it; a backup started from the dashboard runs to the end.

Screenshots of each dashboard step go to $VMDR_AGENT_SHOTS (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.estate import TestVM

from .agent_services import running_agent
from .vmtools import VMDR, repo_env, vmdr

pytestmark = [pytest.mark.vm, pytest.mark.chromium]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def agent_setup(live_vm: TestVM, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[str, Path, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("agent")
    env = repo_env(tmp)
    port = free_port()
    cfg = tmp / "vmdr.toml"
    cfg.write_text(f"""
connect = "qemu:///system"

[repositories.local]
url = "{env['VMDR_REPO']}"
password_file = "{env['VMDR_PASSWORD_FILE']}"

[agent]
listen = "127.0.0.1:{port}"
state = "{tmp}/agent.db"

[policies.demo]
vms = ["{live_vm.name}"]
schedule = "minutely"
repository = "local"
""")
    env = dict(env, VMDR_CONFIG=str(cfg))
    for k in ("VMDR_REPO", "VMDR_PASSWORD_FILE"):
        env.pop(k)
    with running_agent(env, port, tmp / "agent.log", tries=100) as url:
        yield url, tmp, env


def test_minutely_policy_backs_the_vm_up_by_itself(
        live_vm: TestVM, agent_setup: tuple[str, Path, dict[str, str]]) -> None:
    url, tmp, env = agent_setup
    started = time.monotonic()
    job = None
    while time.monotonic() - started < 120:
        rows = json.loads(vmdr(env, "jobs", "--json").stdout)
        done = [r for r in rows if r["vm"] == live_vm.name and r["state"] in ("ok", "failed")]
        if done:
            job = done[-1]
            break
        time.sleep(2)
    assert job is not None, "no scheduled backup within two minutes:\n" + (
        tmp / "agent.log").read_text()[-3000:]
    assert job["state"] == "ok", job
    assert job["type"] == "backup" and job["policy"] == "demo"
    assert job["requested_by"] == "schedule" and job["scheduled_for"]
    assert job["started"] - job["scheduled_for"] < 3.0
    assert job["snapshot"] and job["bytes"] is not None
    snaps = json.loads(vmdr(dict(env, VMDR_REPO=str(tmp / "repo"),
                                 VMDR_PASSWORD_FILE=str(tmp / "pw")),
                            "snapshots", "--json").stdout)
    assert job["snapshot"] in {s["id"] for s in snaps}
    shown = json.loads(vmdr(env, "jobs", "show", job["id"], "--json").stdout)
    assert shown["id"] == job["id"]
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    assert f'vmdr_backup_last_success_timestamp_seconds{{vm="{live_vm.name}"}}' in metrics


def _browser() -> Any:  # a selenium webdriver.Chrome (selenium has no type hints here)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian chromium and chromium-driver are needed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
              "--disable-dev-shm-usage", "--disable-background-networking",
              "--disable-component-update", "--no-first-run"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_dashboard_login_backup_now_and_history(
        live_vm: TestVM, agent_setup: tuple[str, Path, dict[str, str]]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    url, tmp, env = agent_setup
    shots = Path(os.environ.get("VMDR_AGENT_SHOTS", str(tmp / "shots")))
    shots.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([*VMDR, "agent", "user", "add", "ops", "--role", "operator"],
                       input="a long enough password\n", text=True, env=env,
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    b = _browser()
    try:
        b.get(url + "/")
        assert b.current_url.endswith("/login")
        b.find_element(By.ID, "user").send_keys("ops")
        b.find_element(By.ID, "password").send_keys("a long enough password")
        b.save_screenshot(str(shots / "1-login.png"))
        b.find_element(By.ID, "login").click()
        # the click posts a form; wait for the redirect (slow on a loaded machine)
        WebDriverWait(b, 60).until(lambda d: "Overview" in d.page_source)
        b.save_screenshot(str(shots / "2-overview.png"))
        b.get(f"{url}/vms")
        assert live_vm.name in b.find_element(By.ID, "vms").text
        b.get(f"{url}/vms/{live_vm.name}")
        b.save_screenshot(str(shots / "3-vm.png"))
        # The click posts a form and the browser follows the redirect to the job's page;
        # wait for that navigation (a loaded machine takes a while to queue the job). A
        # scheduled backup of the VM may already be queued (409): go back and try again.
        deadline = time.monotonic() + 120
        while True:
            b.find_element(By.ID, "backup-now").click()
            WebDriverWait(b, 60).until(
                lambda d: "/jobs/" in d.current_url or "already queued" in d.page_source)
            if "/jobs/" in b.current_url or time.monotonic() > deadline:
                break
            time.sleep(2)
            b.get(f"{url}/vms/{live_vm.name}")
        assert "/jobs/" in b.current_url, b.page_source[:2000]
        job_id = b.current_url.rsplit("/", 1)[1]
        deadline = time.monotonic() + 150
        state = ""
        while time.monotonic() < deadline:
            # read in one script: htmx swaps the job's block every second
            state = b.execute_script(
                "const e = document.getElementById('job-state');"
                "return e ? e.textContent.trim() : '';")
            if state in ("ok", "failed", "interrupted"):
                break
            time.sleep(1)
        b.save_screenshot(str(shots / "4-job.png"))
        assert state == "ok", b.execute_script("return document.body.innerText")
        b.get(f"{url}/jobs")
        history = b.find_element(By.ID, "jobs").text
        assert job_id in history and live_vm.name in history
        b.save_screenshot(str(shots / "5-history.png"))
    finally:
        b.quit()
    print(f"screenshots in {shots}", file=sys.stderr)


def test_boot_verification_screenshot_on_the_dashboard(
        live_vm: TestVM, agent_setup: tuple[str, Path, dict[str, str]]) -> None:
    """A boot verification queued through the API ends ok, and the overview shows its
    console screenshot, served by the agent."""
    url, tmp, env = agent_setup
    token = subprocess.run([*VMDR, "agent", "token", "create", "--role", "operator"],
                           env=env, capture_output=True, text=True, timeout=60
                           ).stdout.splitlines()[-1]
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    req = urllib.request.Request(f"{url}/api/v1/vms/{live_vm.name}/verify", method="POST",
                                 data=json.dumps({"boot": True}).encode(), headers=auth)
    job = json.loads(urllib.request.urlopen(req, timeout=30).read())
    deadline = time.monotonic() + 400
    state = "queued"
    while time.monotonic() < deadline and state in ("queued", "running"):
        time.sleep(3)
        r = urllib.request.Request(f"{url}/api/v1/jobs/{job['id']}", headers=auth)
        got = json.loads(urllib.request.urlopen(r, timeout=30).read())
        state = got["state"]
    assert state == "ok", got
    shots = list((tmp / "evidence" / job["id"]).glob("*.png"))
    assert shots, "no screenshot saved"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    b = _browser()
    try:
        b.get(url + "/login")
        b.find_element(By.ID, "token").send_keys(token)
        b.find_element(By.ID, "login").click()
        WebDriverWait(b, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "img.shot-small"))
        imgs = [i.get_attribute("src") for i in b.find_elements(By.CSS_SELECTOR, "img.shot-small")]
        assert any(job["id"] in (s or "") for s in imgs), imgs
        ok = b.execute_script(
            "const i = document.querySelector('img.shot-small');"
            "return i.complete && i.naturalWidth > 0;")
        assert ok, "the screenshot did not load"
        shots_dir = Path(os.environ.get("VMDR_AGENT_SHOTS", str(tmp / "shots")))
        shots_dir.mkdir(parents=True, exist_ok=True)
        b.save_screenshot(str(shots_dir / "6-verified-boot.png"))
    finally:
        b.quit()
