"""The agent's HA page (/ha) and GET /api/v1/ha in headless chromium, against a real etcd:
the agent's own lease and leadership, a host in maintenance, an HA VM's last failover
test and the newest HA events, as `vmdr ha maintenance` and `vmdr ha test` record them."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from vmdr.agent.coord_etcd import EtcdCoordinator, wait_for
from vmdr.ha.records import FailoverRecord, HARecords
from vmdr.ha.store import HAStore

from .agent_services import Etcd
from .test_agent_live import _browser, free_port
from .vmtools import VMDR

pytestmark = [pytest.mark.etcd, pytest.mark.chromium]


def test_ha_page_shows_leases_maintenance_tests_and_events(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    e = Etcd(1)
    proc = None
    b = None
    try:
        wait_for(e.endpoints)
        prefix = f"/vmdr-ha-web-{os.getpid()}/"
        port = free_port()
        cfg = tmp_path / "vmdr.toml"
        cfg.write_text(f"""
connect = "test:///default"
[agent]
host = "h1"
listen = "127.0.0.1:{port}"
state = "{tmp_path}/agent.db"
etcd = {json.dumps(e.endpoints)}
etcd_prefix = "{prefix}"
lease_ttl = "3s"
[locations.b1]
kind = "building"
[hosts.h1]
location = "b1"
vcpus = 8
memory = "16GiB"
[hosts.h2]
location = "b1"
vcpus = 8
memory = "16GiB"
[vm.web]
host = "h1"
ha = true
vcpus = 1
memory = "1GiB"
""")
        env = dict(os.environ, VMDR_CONFIG=str(cfg))
        log = open(tmp_path / "agent.log", "w")  # noqa: SIM115
        proc = subprocess.Popen([*VMDR, "agent"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        rec = HARecords(HAStore.for_coordinator(EtcdCoordinator(e.endpoints, 3, prefix),
                                                me="test"))
        deadline = time.monotonic() + 60
        while "h1" not in rec.members():
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.3)
        rec.set_maintenance("h2", "firmware update")
        rec.event("maintenance", "h2 enters maintenance: 0 VM(s) to migrate", host="h2")
        rec.set_test(FailoverRecord("web", time.time() - 60, "test", "h1", "h2", 0.4, 7.25))
        rec.event("tested", "failover test of web passed", host="h2", vm="web")
        p = subprocess.run([*VMDR, "agent", "user", "add", "aud", "--role", "auditor"],
                           input="a long enough password\n", text=True, env=env,
                           capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr
        b = _browser()
        b.get(url + "/login")
        b.find_element(By.ID, "user").send_keys("aud")
        b.find_element(By.ID, "password").send_keys("a long enough password")
        b.find_element(By.ID, "login").click()
        WebDriverWait(b, 60).until(lambda d: "Overview" in d.page_source)
        b.find_element(By.LINK_TEXT, "HA").click()
        WebDriverWait(b, 60).until(lambda d: "High availability" in d.page_source)
        b.save_screenshot(os.environ.get("VMDR_HA_SHOT", str(tmp_path / "ha.png")))
        hosts = b.find_element(By.ID, "ha-hosts").text
        assert "h1 held leader" in hosts, hosts
        assert "firmware update" in hosts and "EXPIRED / none" in hosts  # h2: no agent
        vms = b.find_element(By.ID, "ha-vms").text
        assert "web" in vms and "test" in vms and "→ h2 (ready 7.2s)" in vms, vms
        events = b.find_element(By.ID, "ha-events").text
        assert events.index("failover test of web passed") < events.index(
            "h2 enters maintenance"), events  # newest first
        b.get(url + "/api/v1/ha")
        doc = json.loads(b.find_element(By.TAG_NAME, "pre").text)
        assert doc["fleet"] and doc["leader"] == "h1"
        assert {h["host"]: h["maintenance"] for h in doc["hosts"]} == {"h1": False, "h2": True}
        assert doc["vms"][0]["last_test"]["to"] == "h2"
        # unauthenticated API: 401, no data
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(url + "/api/v1/ha", timeout=10)
        assert ei.value.code == 401
    finally:
        if b is not None:
            b.quit()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        e.stop()
