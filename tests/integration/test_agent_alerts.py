"""Alerts to a real SMTP server (aiosmtpd on loopback, STARTTLS + AUTH) and a real HTTP
receiver on loopback: one message when a condition starts, one when it resolves."""

from __future__ import annotations

import email
import email.policy
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_agent_runner import make_agent
from vmdr.agent.daemon import Agent


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("content-length", "0"))
            got.append(json.loads(self.rfile.read(n)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/hook", got
    finally:
        srv.shutdown()


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[tuple[int, Path, list[Any], list[tuple[str, str]]]]:
    controller_mod = pytest.importorskip("aiosmtpd.controller")
    from aiosmtpd.smtp import AuthResult

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    messages: list[Any] = []
    logins: list[tuple[str, str]] = []

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
            messages.append(envelope)
            return "250 OK"

    def auth(server: object, session: object, envelope: object, mechanism: str,
             data: Any) -> AuthResult:
        user, pw = data.login.decode(), data.password.decode()
        logins.append((user, pw))
        return AuthResult(success=(user, pw) == ("alerts", "s3cret pass"))

    from tests.integration.agent_services import free_ports

    (port,) = free_ports(1)
    c = controller_mod.Controller(Handler(), hostname="127.0.0.1", port=port,
                                  tls_context=ctx, require_starttls=True,
                                  authenticator=auth, auth_require_tls=True)
    c.start()
    try:
        yield port, cert, messages, logins
    finally:
        c.stop()


def _wait(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_webhook_and_mail_deduplicated_with_resolve(
        tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]],
        smtp: tuple[int, Path, list[Any], list[tuple[str, str]]]) -> None:
    url, hooks = webhook
    port, cert, mails, logins = smtp
    pw = tmp_path / "smtp-pw"
    pw.write_text("s3cret pass\n")
    pw.chmod(0o600)
    a: Agent = make_agent(tmp_path, ["vm1"], extra=f"""
[agent.alerts]
webhook = "{url}"
smtp_host = "localhost"
smtp_port = {port}
smtp_user = "alerts"
smtp_password_file = "{pw}"
smtp_cafile = "{cert}"
mail_to = ["ops@example.org"]
""")
    al = a.alerter
    assert al.fire("rpo:vm1", "rpo_breach", "vm1: achieved RPO 30 h is past its target 26 h")
    assert not al.fire("rpo:vm1", "rpo_breach", "vm1: still late")  # de-duplicated
    assert al.resolve("rpo:vm1", "vm1: RPO back within target")
    assert not al.resolve("rpo:vm1", "again")
    al.wait()
    _wait(lambda: len(mails) >= 2 and len(hooks) >= 2)
    assert [h["status"] for h in hooks] == ["firing", "resolved"]
    assert hooks[0]["kind"] == "rpo_breach" and hooks[0]["key"] == "rpo:vm1"
    assert len(mails) == 2 and logins[0] == ("alerts", "s3cret pass")
    bodies = [m.content.decode() for m in mails]
    parsed = [email.message_from_bytes(m.content, policy=email.policy.default) for m in mails]
    subjects = [str(p["subject"]).strip() for p in parsed]
    assert subjects[0].startswith("[vmdr firing] rpo_breach: vm1: achieved RPO 30 h")
    assert subjects[1].startswith("[vmdr resolved] rpo_breach")
    assert all("s3cret" not in b for b in bodies)
    assert mails[0].rcpt_tos == ["ops@example.org"]


def test_slack_and_gotify_payloads(tmp_path: Path,
                                   webhook: tuple[str, list[dict[str, Any]]]) -> None:
    url, hooks = webhook
    for fmt, key in (("slack", "text"), ("gotify", "priority")):
        (tmp_path / fmt).mkdir()
        a = make_agent(tmp_path / fmt, ["vm1"], extra=f"""
[agent.alerts]
webhook = "{url}"
webhook_format = "{fmt}"
""")
        a.alerter.fire("job:backup:vm1", "job_failed", "backup of vm1 failed")
        a.alerter.wait()
        _wait(lambda key=key: any(key in h for h in hooks))
        assert any(key in h for h in hooks)
