"""`vmdr agent` and its subcommands from the command line: bad config is one line and
exit 2, tokens print alone on the last line, SIGHUP keeps the old config on errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.unit.test_agent_runner import CONFIG, make_agent
from vmdr.agent.history import History

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMDR, *args], capture_output=True, text=True, timeout=60,
                          input=input)


def write(tmp_path: Path, extra: str = "", listen: str = "127.0.0.1:8799") -> str:
    p = tmp_path / "vmdr.toml"
    text = CONFIG.format(tmp=tmp_path).replace('[agent]\n', f'[agent]\nlisten = "{listen}"\n')
    p.write_text(text + extra)
    return str(p)


def test_bad_config_at_start_is_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = Path(write(tmp_path))
    cfg.write_text(cfg.read_text().replace("minutely", "every day at noon"))
    p = run("--config", str(cfg), "agent")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "policies.demo.schedule" in p.stderr and "Traceback" not in p.stderr
    cfg = Path(write(tmp_path, listen="0.0.0.0:8780"))
    p = run("--config", str(cfg), "agent")
    assert p.returncode == 2 and "tls_cert" in p.stderr and p.stderr.count("\n") == 1


def test_token_create_prints_the_token_alone_on_the_last_line(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    p = run("--config", cfg, "agent", "token", "create", "--role", "auditor", "--name", "ro")
    assert p.returncode == 0, p.stderr
    token = p.stdout.splitlines()[-1]
    assert token.startswith("vmdr_") and " " not in token
    h = History.open(str(tmp_path / "agent.db"))
    row = h.token_by_hash(hashlib.sha256(token.encode()).hexdigest())
    assert row is not None and row["role"] == "auditor" and row["name"] == "ro"
    listed = run("--config", cfg, "agent", "token", "list")
    assert "ro" in listed.stdout and token not in listed.stdout
    assert run("--config", cfg, "agent", "token", "create", "--role", "root").returncode == 2
    tid = token.split("_")[1]
    assert run("--config", cfg, "agent", "token", "revoke", tid).returncode == 0
    assert h.token_by_hash(hashlib.sha256(token.encode()).hexdigest()) is None
    p = run("--config", cfg, "agent", "user", "add", "alice", "--role", "admin",
            input="short\n")
    assert p.returncode == 2 and "8 characters" in p.stderr
    p = run("--config", cfg, "agent", "user", "add", "alice", "--role", "admin",
            input="long enough pw\n")
    assert p.returncode == 0 and "long enough" not in p.stdout + p.stderr


def test_reload_keeps_the_old_config_when_the_new_one_is_bad(tmp_path: Path) -> None:
    a = make_agent(tmp_path, ["vm1"])
    cfgfile = Path(a.cfg.path or "")
    good = cfgfile.read_text()
    cfgfile.write_text(good.replace("minutely", "sometimes"))
    assert not a.reload()
    assert a.cfg.policies["demo"].schedule == "minutely"
    cfgfile.write_text(good.replace("minutely", "hourly"))
    assert a.reload()
    assert a.cfg.policies["demo"].schedule == "hourly"
    assert [s.event.text for s in a.schedules] == ["hourly"]


def test_the_daemon_serves_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Path(write(tmp_path, listen=f"127.0.0.1:{port}"))
    cfg.write_text(cfg.read_text().replace('vms = ["vm*"]', 'vms = ["nothing-matches-*"]'))
    env = dict(os.environ, VMDR_CONFIG=str(cfg))
    proc = subprocess.Popen([*VMDR, "agent"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        import urllib.request

        body = b""
        for _ in range(150):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health",
                                              timeout=2).read()
                if b'"leader":true' in body:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert b'"leader":true' in body
        cfg.write_text(cfg.read_text().replace("minutely", "sometimes"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "reload failed, keeping the old config" in err and "sometimes" in err


def test_https_with_tls_cert_and_secure_cookie(tmp_path: Path) -> None:
    """With tls_cert/tls_key the agent serves HTTPS only, and its session cookie is Secure."""
    import http.client
    import socket
    import ssl

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = Path(write(tmp_path, listen=f"127.0.0.1:{port}"))
    cfg.write_text(cfg.read_text().replace(
        "[agent]\n", f'[agent]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'))
    token = run("--config", str(cfg), "agent", "token", "create", "--role", "auditor"
                ).stdout.splitlines()[-1]
    proc = subprocess.Popen([*VMDR, "--config", str(cfg), "agent"], stderr=subprocess.PIPE,
                            text=True)
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        for _ in range(150):
            try:
                c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
                c.request("GET", "/api/v1/health")
                assert c.getresponse().status == 200
                break
            except (OSError, http.client.HTTPException):
                time.sleep(0.1)
        c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
        c.request("POST", "/login", body=f"token={token}",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        assert r.status == 303
        cookie = r.getheader("set-cookie") or ""
        assert "vmdr_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            plain.request("GET", "/api/v1/health")
            status = plain.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
        assert status in (0, 400)  # no plain HTTP answer
    finally:
        proc.terminate()
        proc.wait(30)
