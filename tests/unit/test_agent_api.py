"""The REST API and dashboard in-process: roles, tokens, sessions, CSRF, rate limits,
OpenAPI, /metrics, SSE."""

from __future__ import annotations

import asyncio
import json
import re
import time
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():  # starlette prefers httpx2 for its test client
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient

from tests.unit.test_agent_runner import make_agent, queue
from vmdr.agent.auth import add_user, create_token
from vmdr.agent.daemon import Agent
from vmdr.agent.server import build_app, listen_address
from vmdr.errors import UsageError


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return make_agent(tmp_path, ["vm1", "vm2", "vm-fail"])


@pytest.fixture
def client(agent: Agent) -> TestClient:
    return TestClient(build_app(agent), follow_redirects=False)


def bearer(agent: Agent, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(agent.history, role)}"}


def test_each_role_gets_exactly_its_rights(agent: Agent, client: TestClient) -> None:
    aud, op, adm = (bearer(agent, r) for r in ("auditor", "operator", "admin"))
    assert client.get("/api/v1/vms").status_code == 401
    assert client.get("/api/v1/vms", headers=aud).status_code == 200
    r = client.post("/api/v1/vms/vm1/backup", headers=aud)
    assert r.status_code == 403 and agent.history.jobs() == []
    r = client.post("/api/v1/vms/vm1/backup", headers=op, json={"mode": "full"})
    assert r.status_code == 202 and r.json()["state"] == "queued"
    assert r.json()["requested_by"].startswith("token:operator-")
    assert client.post("/api/v1/vms/vm1/backup", headers=op).status_code == 409  # coalesced
    new = {"target_dir": "/tmp/r", "name": "vm1-copy"}
    assert client.post("/api/v1/vms/vm1/restore", headers=aud, json=new).status_code == 403
    assert client.post("/api/v1/vms/vm1/restore", headers=op, json=new).status_code == 202
    inplace = {"target_dir": "/tmp/r"}
    assert client.post("/api/v1/vms/vm2/restore", headers=op, json=inplace).status_code == 403
    r = client.post("/api/v1/vms/vm2/restore", headers=adm, json=inplace)
    assert r.status_code == 202 and r.json()["args"]["force"] is True
    assert client.post("/api/v1/vms/vm2/verify", headers=op,
                       json={"boot": True}).status_code == 202
    assert client.post("/api/v1/vms/vm2/copy", headers=op,
                       json={"to": "offsite"}).status_code == 202
    assert len(agent.history.jobs()) == 5


def test_bad_tokens_and_bad_input(agent: Agent, client: TestClient) -> None:
    op = bearer(agent, "operator")
    for h in ({"Authorization": "Bearer vmdr_x_y"}, {"Authorization": "Basic abc"}):
        assert client.get("/api/v1/vms", headers=h).status_code == 401
    expired = create_token(agent.history, "admin", ttl_s=0.001)
    time.sleep(0.01)
    assert client.get("/api/v1/vms", headers={"Authorization": f"Bearer {expired}"}
                      ).status_code == 401
    assert client.post("/api/v1/vms/nope/backup", headers=op).status_code == 404
    assert client.post("/api/v1/vms/vm1/backup", headers=op, content=b"[1]").status_code == 400
    assert client.post("/api/v1/vms/vm1/backup", headers=op,
                       json={"mode": "weird"}).status_code == 400
    assert client.post("/api/v1/vms/vm1/restore", headers=op,
                       json={"target_dir": "rel", "name": "x"}).status_code == 400
    assert client.get("/api/v1/jobs?limit=0", headers=op).status_code == 400
    assert client.get("/api/v1/jobs/nope", headers=op).status_code == 404


def test_bad_tokens_are_rate_limited(agent: Agent, client: TestClient) -> None:
    codes = [client.get("/api/v1/vms", headers={"Authorization": f"Bearer vmdr_{i}_x"}
                        ).status_code for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]


def test_token_is_stored_as_a_hash_only(agent: Agent, tmp_path: Path) -> None:
    token = create_token(agent.history, "admin", "ci")
    agent.history.close()
    raw = (tmp_path / "agent.db").read_bytes()
    assert token.encode() not in raw and token.split("_", 2)[2].encode() not in raw


def test_openapi_document_covers_every_api_route(client: TestClient) -> None:
    doc = client.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    from vmdr.agent import web_ha
    from vmdr.agent.api import routes

    paths = {r.path for r in [*routes, *web_ha.routes] if r.path.startswith("/api/")} - {
        "/api/v1/openapi.json"}
    assert paths == set(doc["paths"])


def test_jobs_listing_and_detail_and_sse(agent: Agent, client: TestClient) -> None:
    aud = bearer(agent, "auditor")
    j = asyncio.run(agent.runner.run(queue(agent, "vm1")))
    rows = client.get("/api/v1/jobs?limit=10", headers=aud).json()["jobs"]
    assert [r["id"] for r in rows] == [j.id]
    detail = client.get(f"/api/v1/jobs/{j.id}", headers=aud).json()
    assert detail["state"] == "ok" and detail["events"][0]["type"] == "start"
    with client.stream("GET", f"/api/v1/jobs/{j.id}/events", headers=aud) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    kinds = re.findall(r"^event: (\w+)$", body, re.M)
    assert kinds == ["start", "progress", "progress", "progress", "end", "done"]
    vm = client.get("/api/v1/vms/vm1", headers=aud).json()
    assert vm["last_backup"] and vm["rpo_s"] is not None and vm["rpo_ok"] is True


def test_metrics_follow_prometheus_conventions(agent: Agent, client: TestClient) -> None:
    asyncio.run(agent.runner.run(queue(agent, "vm1")))
    asyncio.run(agent.runner.run(queue(agent, "vm-fail")))
    agent.history.add_repo_stat("local", time.time(), 4096, 2)
    text = client.get("/metrics").text
    assert re.search(r'^vmdr_backup_last_success_timestamp_seconds\{vm="vm1"\} \d+\.\d+$',
                     text, re.M)
    assert 'vm="vm-fail"' not in text.split("vmdr_rpo_seconds")[0]
    assert re.search(r'^vmdr_rpo_seconds\{vm="vm1"\} ', text, re.M)
    assert 'vmdr_job_duration_seconds_bucket{type="backup",outcome="failed",le="+Inf"} 1' in text
    assert 'vmdr_job_duration_seconds_count{type="backup",outcome="ok"} 1' in text
    assert 'vmdr_repository_stored_bytes{repository="local"} 4096' in text
    assert "vmdr_jobs_running 0" in text
    assert "# TYPE vmdr_verify_last_success_timestamp_seconds gauge" in text
    for family in re.findall(r"^# TYPE (\S+) ", text, re.M):
        assert family.startswith("vmdr_")


def test_dashboard_login_session_and_csrf(agent: Agent, client: TestClient) -> None:
    add_user(agent.history, "ops", "operator", "correct horse")
    assert client.get("/").headers["location"] == "/login"
    r = client.post("/login", data={"user": "ops", "password": "wrong one"})
    assert r.status_code == 401 and "vmdr_session" not in r.cookies
    r = client.post("/login", data={"user": "ops", "password": "correct horse"})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = client.get("/vms/vm1")
    assert page.status_code == 200 and "Back up now" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    # without the CSRF token nothing happens
    assert client.post("/vms/vm1/backup", data={}).status_code == 403
    assert agent.history.jobs() == []
    r = client.post("/vms/vm1/backup", data={"csrf": csrf.group(1)})
    assert r.status_code == 303 and r.headers["location"].startswith("/jobs/")
    assert [j.vm for j in agent.history.jobs()] == ["vm1"]
    for path in ("/", "/vms", "/jobs", "/repositories", r.headers["location"]):
        assert client.get(path).status_code == 200, path
    assert "password" not in json.dumps(agent.history.jobs()[0].as_dict())


def test_login_is_rate_limited(agent: Agent, client: TestClient) -> None:
    add_user(agent.history, "ops", "operator", "correct horse")
    codes = [client.post("/login", data={"user": "ops", "password": f"bad{i}"}).status_code
             for i in range(11)]
    assert codes[-1] == 429
    # even the right password waits out the window
    assert client.post("/login", data={"user": "ops", "password": "correct horse"}
                       ).status_code == 429


def test_auditor_sees_no_buttons_and_cannot_post(agent: Agent, client: TestClient) -> None:
    token = create_token(agent.history, "auditor")
    assert client.post("/login", data={"token": token}).status_code == 303
    page = client.get("/vms/vm1").text
    assert "Back up now" not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/vms").text)
    assert csrf is not None
    assert client.post("/vms/vm1/backup", data={"csrf": csrf.group(1)}).status_code == 403
    assert agent.history.jobs() == []


def test_https_is_required_off_loopback(agent: Agent) -> None:
    agent.cfg.agent.listen = "0.0.0.0:8780"
    with pytest.raises(UsageError, match="tls_cert"):
        listen_address(agent.cfg)
    agent.cfg.agent.listen = "[::1]:8780"
    assert listen_address(agent.cfg) == ("::1", 8780, False)
