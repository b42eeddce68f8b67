"""The API's hot listings (cached per history version, keyset paging), /metrics access,
and every dashboard page rendered through vmdr.templating (undefined names are errors)."""

from __future__ import annotations

import asyncio
import time
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

from tests.unit.test_agent_runner import make_agent, queue
from vmdr import config
from vmdr.agent.auth import create_token
from vmdr.agent.daemon import Agent
from vmdr.agent.server import build_app
from vmdr.errors import ConfigError


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return make_agent(tmp_path, ["vm1", "vm2"])


@pytest.fixture
def client(agent: Agent) -> TestClient:
    return TestClient(build_app(agent), follow_redirects=False)


def auditor(agent: Agent) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(agent.history, 'auditor')}"}


def _rows(n: int, now: float) -> list[dict[str, object]]:
    return [{"id": f"j{i:05d}", "type": "backup", "vm": f"vm{i % 2 + 1}", "policy": "demo",
             "repository": "local", "host": "h1", "state": "ok", "created": now - 1000 + i,
             "scheduled_for": None, "started": now - 1000 + i, "ended": now - 999 + i,
             "exit_code": 0, "bytes": 1, "snapshot": None, "requested_by": "test",
             "args": "{}", "result": None, "error": None, "pid": None} for i in range(n)]


def test_keyset_pages_walk_the_whole_history_once(agent: Agent, client: TestClient) -> None:
    agent.history.bulk_jobs(_rows(250, time.time()))
    h = auditor(agent)
    seen: list[str] = []
    url = "/api/v1/jobs?limit=100"
    while True:
        body = client.get(url, headers=h).json()
        seen += [j["id"] for j in body["jobs"]]
        if body["next"] is None:
            break
        url = f"/api/v1/jobs?limit=100&before={body['next']}"
    assert seen == [f"j{i:05d}" for i in reversed(range(250))]
    assert client.get("/api/v1/jobs?before=nope", headers=h).json()["jobs"] == []
    assert client.get("/api/v1/jobs?before=a%20b", headers=h).status_code == 400
    vm2 = client.get("/api/v1/jobs?vm=vm2&limit=5", headers=h).json()
    assert [j["vm"] for j in vm2["jobs"]] == ["vm2"] * 5


def test_cached_listings_follow_every_change(agent: Agent, client: TestClient) -> None:
    h = auditor(agent)
    assert client.get("/api/v1/jobs", headers=h).json()["jobs"] == []
    vms = client.get("/api/v1/vms", headers=h).json()["vms"]
    assert [v["last_backup"] for v in vms] == [None, None]
    j = queue(agent, "vm1")  # queued: the next listing shows it at once
    listed = client.get("/api/v1/jobs", headers=h).json()["jobs"]
    assert [(x["id"], x["state"]) for x in listed] == [(j.id, "queued")]
    done = asyncio.run(agent.runner.run(j))  # ended: both listings change at once
    assert done.state == "ok"
    listed = client.get("/api/v1/jobs", headers=h).json()["jobs"]
    assert [(x["id"], x["state"]) for x in listed] == [(j.id, "ok")]
    vms = {v["name"]: v for v in client.get("/api/v1/vms", headers=h).json()["vms"]}
    assert vms["vm1"]["last_backup"] == done.ended and vms["vm2"]["last_backup"] is None
    # an unchanged history answers the same bytes without a query
    a1 = client.get("/api/v1/vms", headers=h).content
    assert client.get("/api/v1/vms", headers=h).content == a1


def test_metrics_access(agent: Agent, client: TestClient, tmp_path: Path) -> None:
    assert client.get("/metrics").status_code == 200  # loopback, no token set: open
    agent.cfg.agent.listen = "0.0.0.0:8780"  # off loopback: credentials
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auditor(agent)).status_code == 200
    agent.cfg.agent.listen = "127.0.0.1:8780"
    agent.cfg.agent.metrics_token = "s" * 32  # a scrape token: needed on loopback too
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers={"Authorization": "Bearer " + "s" * 32})
    assert r.status_code == 200 and "vmdr_jobs_running 0" in r.text
    # the scrape token opens /metrics only, and a wrong one counts as a failure
    assert client.get("/api/v1/vms", headers={"Authorization": "Bearer " + "s" * 32}
                      ).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers=auditor(agent)).status_code == 200


def test_metrics_token_file_is_checked_at_load(tmp_path: Path) -> None:
    base = f'[repositories.local]\nurl = "{tmp_path}/r"\n[agent]\nstate = "{tmp_path}/a.db"\n'
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(base + f'metrics_token_file = "{tmp_path}/missing"\n')
    with pytest.raises(ConfigError, match="metrics_token_file"):
        config.load(str(cfg))
    (tmp_path / "tok").write_text("short\n")
    cfg.write_text(base + f'metrics_token_file = "{tmp_path}/tok"\n')
    with pytest.raises(ConfigError, match="16 or more"):
        config.load(str(cfg))
    (tmp_path / "tok").write_text("t" * 40 + "\n")
    c = config.load(str(cfg))
    assert c.agent.metrics_token == "t" * 40 and "t" * 40 not in repr(c.agent)


def test_job_duration_histogram_is_cumulative(agent: Agent, client: TestClient) -> None:
    now = time.time()
    rows = _rows(3, now)
    for r, secs in zip(rows, (1, 4, 400), strict=True):
        r["ended"] = float(r["started"]) + secs  # type: ignore[arg-type]
    agent.history.bulk_jobs(rows)
    text = client.get("/metrics").text
    lab = 'type="backup",outcome="ok"'
    assert f'vmdr_job_duration_seconds_bucket{{{lab},le="1"}} 1' in text
    assert f'vmdr_job_duration_seconds_bucket{{{lab},le="5"}} 2' in text
    assert f'vmdr_job_duration_seconds_bucket{{{lab},le="300"}} 2' in text
    assert f'vmdr_job_duration_seconds_bucket{{{lab},le="600"}} 3' in text
    assert f"vmdr_job_duration_seconds_count{{{lab}}} 3" in text
    agent.history.bulk_jobs([dict(rows[0], id="later")])  # a change is seen at once
    assert f"vmdr_job_duration_seconds_count{{{lab}}} 4" in client.get("/metrics").text


def test_every_dashboard_page_renders(agent: Agent, client: TestClient) -> None:
    token = create_token(agent.history, "admin")
    assert client.post("/login", data={"token": token}).status_code == 303
    j = asyncio.run(agent.runner.run(queue(agent, "vm1")))
    for path in ("/", "/vms", "/vms/vm1", "/jobs", "/jobs?fragment=1", f"/jobs/{j.id}",
                 f"/jobs/{j.id}?fragment=1", "/repositories", "/plan"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[-400:])
        assert "<" in r.text
    assert client.get("/vms/none").status_code == 404
    client.cookies.clear()
    assert client.get("/login").status_code == 200


def test_jobs_by_id_is_one_lookup(agent: Agent) -> None:
    agent.history.bulk_jobs(_rows(3, time.time()))
    got = agent.history.jobs_by_id(["j00000", "j00002", "nope"])
    assert sorted(got) == ["j00000", "j00002"] and got["j00002"].vm == "vm1"


def test_a_stale_plan_answer_is_served_while_it_is_refreshed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vmdr.agent import views

    calls: list[list[str]] = []

    def run(cfg: object, args: list[str], timeout: float, key: tuple[str, ...]
            ) -> tuple[object, None]:
        calls.append(args)
        time.sleep(2.0)
        with views._lock:
            views._cache[key] = (time.monotonic(), {"fresh": True}, None)
        return {"fresh": True}, None

    monkeypatch.setattr(views, "_run", run)
    cfg = config.Config(path="/nonexistent/stale.toml")
    key = (cfg.path or "", "plan", "coverage")
    monkeypatch.setitem(views._cache, key, (time.monotonic() - 1000, {"fresh": False}, None))
    t = time.monotonic()
    data, _ = views.run_json(cfg, ["plan", "coverage"], ttl=300, stale_ok=True)
    assert data == {"fresh": False} and time.monotonic() - t < 1.5  # did not wait (2 s)
    deadline = time.monotonic() + 30
    while views._cache[key][1] != {"fresh": True} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert views.run_json(cfg, ["plan", "coverage"], ttl=300, stale_ok=True)[0] == {
        "fresh": True}
    assert len(calls) == 1
