"""The API fuzzed against its own OpenAPI document (schemathesis): no 5xx for any input,
nothing answered without a token, and no write passes with an auditor's token."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.unit.test_agent_runner import make_agent  # noqa: E402
from vmdr.agent.auth import create_token  # noqa: E402
from vmdr.agent.server import RateLimit, build_app  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _tmp = Path(tempfile.mkdtemp(prefix="vmdr-fuzz-"))
    atexit.register(shutil.rmtree, _tmp, True)
    AGENT = make_agent(_tmp, ["vm1", "vm2"])
    APP = build_app(AGENT)
    APP.state.limiter = RateLimit(limit=10**9)  # rate limits have their own test
    TOKENS = {r: create_token(AGENT.history, r) for r in ("auditor", "operator", "admin")}

PUBLIC = {"/api/v1/health", "/api/v1/openapi.json"}
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)


@schema.parametrize()  # type: ignore[untyped-decorator]  # schemathesis: no hints
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_fuzz(case: Any) -> None:
    path = case.operation.path
    if path.endswith("/events"):
        return  # the SSE stream stays open while its job is not finished
    before = len(AGENT.history.jobs(limit=1000))

    def as_(token: str | None) -> Any:
        headers = {k: v for k, v in (case.headers or {}).items()
                   if k.lower() != "authorization"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        case.headers = headers
        return case.call()

    # whatever the generated request carries as credentials: never a 5xx, never a pass
    r = case.call()
    assert r.status_code < 500, (path, r.status_code, r.text)
    if path not in PUBLIC:
        assert r.status_code in (401, 404, 405), (path, r.status_code)
    # no credentials: 401 unless public
    r = as_(None)
    assert r.status_code < 500, (path, r.status_code, r.text)
    if path not in PUBLIC:
        # 404/405: no such route or method (the router answers before any handler)
        assert r.status_code in (401, 404, 405), (path, r.status_code)
    # an auditor never changes anything
    r = as_(TOKENS["auditor"])
    assert r.status_code < 500, (path, r.status_code, r.text)
    if case.method.upper() == "POST":
        assert r.status_code in (400, 403, 404, 405, 422), (path, r.status_code)
    assert len(AGENT.history.jobs(limit=1000)) == before
    # an admin: any input, still never a server error
    r = as_(TOKENS["admin"])
    assert r.status_code < 500, (path, r.status_code, r.text)
