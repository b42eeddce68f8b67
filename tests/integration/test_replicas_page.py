"""The dashboard's /replicas in headless chromium: a real agent reading the replica and
mirror state files at a (local) DR site, as ``vmdr replicate status`` does.

The state files are written with vmdr's own state classes, as a supervisor and a cycle
leave them: one VM whose mirror is in step (Meeting SLA), one whose mirror fell back and
whose last snapshot cycle failed long ago (Error), and one an HA copy was started from
(its marker and overlay: in use, not replicated; :mod:`vmdr.jobs.replica_guard`). The two-site test
(test_mirror_twosite.py) produces the same files from a real mirror."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdr.jobs.mirror_state import FALLBACK, MIRRORING, MirrorState
from vmdr.jobs.replica_guard import marker
from vmdr.jobs.replicate_state import Cycle, ReplicaState, RestorePoint

from .agent_services import running_agent
from .test_agent_live import _browser, free_port
from .vmtools import VMDR

pytestmark = [pytest.mark.chromium]


def _state(root: Path, vm: str, point_age: float, ms: MirrorState, failed: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    d = root / vm
    d.mkdir(parents=True)
    st = ReplicaState(vm=vm, source_uri="qemu:///system", source_uuid="u-" + vm,
                      standby=f"{vm}-replica", standby_uuid="s-" + vm,
                      target_uri="qemu:///system", directory=str(d), prefix="vmdr-replica-x",
                      rpo_target_s=60.0)
    t = (now - dt.timedelta(seconds=point_age)).isoformat()
    st.points = [RestorePoint("rp-20261206T040000Z", t, "direct", "incremental", 4 << 20)]
    st.cycles = [Cycle(t, 1.5, "direct", "incremental", bytes_moved=4 << 20),
                 Cycle(t, 0.2, "direct", "none", error="DR host unreachable" if failed
                       else None)]
    (d / "replica.json").write_bytes(st.to_json())
    (d / "mirror.json").write_bytes(ms.to_json())


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    now = dt.datetime.now(dt.UTC)
    dr = tmp_path / "dr"
    hot = MirrorState("hot1", "sync", state=MIRRORING, in_sync_at=now.isoformat())
    gone = MirrorState("gone1", "mirror", state=FALLBACK,
                       in_sync_at=(now - dt.timedelta(hours=2)).isoformat(),
                       error="the link to the DR site is down (ssh tunnel ended)", aborts=1)
    _state(dr, "hot1", 3600, hot, False)
    _state(dr, "gone1", 7200, gone, True)
    # ha1: an HA copy was started from its replica (marker + overlay, see replica_guard)
    _state(dr, "ha1", 30, MirrorState("ha1", "mirror", state=FALLBACK), False)
    (dr / "ha1" / "ha").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dr / "ha1" / "ha" /
                                                                   "vda.qcow2"), "1M"],
                   check=True)
    (dr / "ha1" / "ha-inuse.json").write_bytes(marker("ha1", "h3", [], "rp-1"))
    port = free_port()
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f"""
connect = "qemu:///system"

[agent]
listen = "127.0.0.1:{port}"
state = "{tmp_path}/agent.db"

[replicas]
vms = ["hot1", "gone1", "ha1"]
to = "qemu:///system"
dir = "{dr}"
rpo = "1m"
""")
    env = {"VMDR_CONFIG": str(cfg), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    p = subprocess.run([*VMDR, "agent", "user", "add", "ops", "--role", "auditor"],
                       input="a long enough password\n", text=True, env=env,
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with running_agent(env, port, tmp_path / "agent.log", tries=150) as url:
        yield url, env


def test_replicas_page_shows_modes_and_sla(agent: tuple[str, dict[str, str]],
                                           tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    url, env = agent
    # the CLI says the same as the page will
    p = subprocess.run([*VMDR, "replicate", "status", "--json"], env=env, text=True,
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {r["vm"]: r for r in json.loads(p.stdout)["replicas"]}
    assert rows["hot1"]["sla_label"] == "Meeting SLA" and rows["hot1"]["mode"] == "sync"
    assert rows["gone1"]["sla_label"] == "Error"
    assert (rows["ha1"]["sla"], rows["ha1"]["sla_label"]) == ("in-use", "In use: not replicated")
    assert rows["ha1"]["in_use"].startswith("in use by the HA copy of ha1 on h3 since ")
    b = _browser()
    try:
        b.get(url + "/login")
        b.find_element(By.ID, "user").send_keys("ops")
        b.find_element(By.ID, "password").send_keys("a long enough password")
        b.find_element(By.ID, "login").click()
        WebDriverWait(b, 60).until(lambda d: "Overview" in d.page_source)
        b.find_element(By.LINK_TEXT, "Replicas").click()
        WebDriverWait(b, 60).until(lambda d: "replicas" in d.current_url)
        table = b.find_element(By.ID, "replicas")
        hot = table.find_element(By.CSS_SELECTOR, 'tr[data-vm="hot1"]').text
        gone = table.find_element(By.CSS_SELECTOR, 'tr[data-vm="gone1"]').text
        ha1 = table.find_element(By.CSS_SELECTOR, 'tr[data-vm="ha1"]').text
        b.save_screenshot(str(tmp_path / "replicas.png"))

        def alerted(d: object) -> bool:  # the agent's minutely replica check fired
            b.get(url + "/")
            return "replica of gone1: Error" in b.page_source

        WebDriverWait(b, 60, poll_frequency=2).until(alerted)
        assert "replica of hot1" not in b.page_source
    finally:
        b.quit()
    assert "sync" in hot and "Meeting SLA" in hot and "mirroring" in hot
    assert "Error" in gone and "fallback" in gone and "ssh tunnel ended" in gone
    assert "rp-20261206T040000Z" in hot
    assert "In use: not replicated" in ha1 and "in use by the HA copy of ha1 on h3" in ha1
