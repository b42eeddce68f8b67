"""Backends against real failures: broken and hanging S3 endpoints, refused credentials,
unknown host keys and an sshd that dies mid-session."""

from __future__ import annotations

import random
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.servers import (
    HOST,
    SeaweedFS,
    SSHServer,
    free_ports,
    start_sshd,
    write_ed25519_key,
)
from vmdr.errors import AuthenticationFailed, StorageError, TransientStorageError, UsageError
from vmdr.storage.base import Backend
from vmdr.storage.registry import open_backend
from vmdr.storage.wrappers import RetryingBackend


def retrying(backend: Backend, attempts: int = 3) -> RetryingBackend:
    """Retry quickly: the tests are about classification, not about waiting."""
    return RetryingBackend(backend, attempts=attempts, base_delay=0.01, max_delay=0.02,
                           rng=random.Random(1))


def assert_one_line(exc: pytest.ExceptionInfo[BaseException], *secrets: str) -> None:
    text = str(exc.value)
    assert text and "\n" not in text
    for secret in secrets:
        assert secret not in text


# -- S3 ---------------------------------------------------------------------------------


class _Unavailable(BaseHTTPRequestHandler):
    requests = 0

    def _answer(self) -> None:
        type(self).requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.close_connection = True  # refuse the body, as a real server does
        elif length:
            self.rfile.read(length)
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unavailable_endpoint() -> Iterator[str]:
    """An HTTP server on loopback that answers 503 to everything."""
    _Unavailable.requests = 0
    server = ThreadingHTTPServer((HOST, 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _tcp_endpoint(hang: bool) -> Iterator[str]:
    """A TCP server on loopback that accepts connections and then never answers
    (*hang*) or drops them at once."""
    listener = socket.create_server((HOST, 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn = listener.accept()[0]
            except OSError:
                continue
            if hang:
                held.append(conn)
            else:
                conn.recv(1024)
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for s in [*held, listener]:
            s.close()


@pytest.fixture
def hanging_endpoint() -> Iterator[str]:
    yield from _tcp_endpoint(hang=True)


@pytest.fixture
def dropping_endpoint() -> Iterator[str]:
    yield from _tcp_endpoint(hang=False)


@pytest.mark.s3
def test_s3_503_is_transient_and_retried(
    unavailable_endpoint: str, s3_env: SeaweedFS
) -> None:
    b = retrying(open_backend(f"s3://vmdr-test/x?endpoint={unavailable_endpoint}"))
    with pytest.raises(TransientStorageError) as exc:
        b.get("data/a")
    assert "503" in str(exc.value)
    assert_one_line(exc, s3_env.secret_key)
    assert _Unavailable.requests == 3  # botocore itself did not retry
    with pytest.raises(TransientStorageError):
        b.put("data/a", b"payload")


@pytest.mark.s3
def test_s3_hanging_endpoint_times_out(hanging_endpoint: str, s3_env: SeaweedFS) -> None:
    b = retrying(
        open_backend(f"s3://vmdr-test/x?endpoint={hanging_endpoint}&timeout=0.3"), attempts=2
    )
    with pytest.raises(TransientStorageError) as exc:
        b.stat("data/a")
    assert "timed out" in str(exc.value)
    assert_one_line(exc, s3_env.secret_key)


@pytest.mark.s3
def test_s3_dropped_connection_is_transient(dropping_endpoint: str, s3_env: SeaweedFS) -> None:
    b = retrying(open_backend(f"s3://vmdr-test/x?endpoint={dropping_endpoint}"), attempts=2)
    with pytest.raises(TransientStorageError) as exc:
        b.put("data/a", b"x" * 10000)
    assert_one_line(exc, s3_env.secret_key)


@pytest.mark.s3
def test_s3_refused_connection_is_transient(s3_env: SeaweedFS) -> None:
    (port,) = free_ports(1)
    b = retrying(open_backend(f"s3://vmdr-test/x?endpoint=http://{HOST}:{port}"), attempts=2)
    with pytest.raises(TransientStorageError) as exc:
        list(b.list("data"))
    assert_one_line(exc)


@pytest.mark.s3
@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_s3_wrong_credentials(
    s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    wrong = "wrong-secret-do-not-print"
    var = "AWS_SECRET_ACCESS_KEY" if which == "secret" else "AWS_ACCESS_KEY_ID"
    monkeypatch.setenv(var, wrong)
    b = retrying(open_backend(f"s3://vmdr-test/auth?endpoint={s3_env.endpoint}&path_style=1"))
    for call in (lambda: b.get("data/a"), lambda: b.stat("data/a"), b.create,
                 lambda: b.put("data/a", b"x")):
        with pytest.raises(AuthenticationFailed) as exc:
            call()
        assert_one_line(exc, s3_env.secret_key, "do-not-print")


@pytest.mark.s3
def test_s3_no_credentials(s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    b = open_backend(f"s3://vmdr-test/x?endpoint={s3_env.endpoint}")
    with pytest.raises(AuthenticationFailed, match="credentials"):
        b.get("data/a")


@pytest.mark.s3
def test_s3_missing_bucket(s3_env: SeaweedFS) -> None:
    bucket = f"vmdr-missing-{random.randrange(10**9)}"
    b = open_backend(f"s3://{bucket}/p?endpoint={s3_env.endpoint}&path_style=1")
    for call in (lambda: b.get("a"), lambda: b.stat("a"), lambda: list(b.list("data")),
                 lambda: b.put("a", b"x"), lambda: b.exists("a")):
        with pytest.raises(StorageError, match="does not exist") as exc:
            call()
        assert type(exc.value) is StorageError  # neither "not found" nor retried
    b.create()
    b.put("a", b"x")
    assert b.get("a") == b"x"


# -- SFTP -------------------------------------------------------------------------------


@pytest.mark.sftp
def test_sftp_unauthorized_key(
    sshd_server: SSHServer, sftp_env: None, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_key"
    write_ed25519_key(stranger)
    b = retrying(open_backend(sshd_server.url(str(sshd_server.data_dir / "x"),
                                              key=str(stranger))))
    with pytest.raises(AuthenticationFailed) as exc:
        b.create()
    assert_one_line(exc)


@pytest.mark.sftp
def test_sftp_wrong_password_in_url(
    sshd_server: SSHServer, sftp_env: None, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_key"
    write_ed25519_key(stranger)
    url = sshd_server.url("/x", key=str(stranger)).replace("root@", "root:s3cr3t-pw@")
    b = open_backend(url)
    assert "s3cr3t-pw" not in b.display_url
    with pytest.raises(AuthenticationFailed) as exc:
        b.stat("a")
    assert_one_line(exc, "s3cr3t-pw")


@pytest.mark.sftp
def test_sftp_unknown_host_key(
    sshd_server: SSHServer, sftp_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts either
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    b = retrying(open_backend(sshd_server.url("/x", known_hosts=str(empty))))
    with pytest.raises(StorageError, match=r"host key .* is unknown") as exc:
        b.get("a")
    assert not isinstance(exc.value, TransientStorageError)
    assert_one_line(exc)


@pytest.mark.sftp
def test_sftp_changed_host_key(sshd_server: SSHServer, sftp_env: None, tmp_path: Path) -> None:
    other = write_ed25519_key(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"[{HOST}]:{sshd_server.port} {other}\n")
    b = open_backend(sshd_server.url("/x", known_hosts=str(known)))
    with pytest.raises(StorageError, match="does not match") as exc:
        b.get("a")
    assert not isinstance(exc.value, TransientStorageError)


@pytest.mark.sftp
def test_sftp_bad_key_file(sshd_server: SSHServer, sftp_env: None, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    for key in (str(garbage), str(tmp_path / "missing")):
        b = open_backend(sshd_server.url("/x", key=key))
        with pytest.raises(UsageError, match="key file"):  # configuration: exit 2, no retry
            b.get("a")


@pytest.mark.sftp
def test_sftp_refused_connection_is_transient(sftp_env: None, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    b = retrying(open_backend(f"sftp://root@{HOST}:{port}/x"), attempts=2)
    with pytest.raises(TransientStorageError, match="cannot connect") as exc:
        b.get("a")
    assert_one_line(exc)


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[SSHServer]:
    """An sshd of this test's own, free to be killed and restarted."""
    server = start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.sftp
def test_sftp_server_dies_then_comes_back(own_sshd: SSHServer, sftp_env: None) -> None:
    b = open_backend(own_sshd.url(str(own_sshd.data_dir / "repo"), timeout="5"))
    b.create()
    b.put("data/a", b"before")
    own_sshd.stop(signal.SIGKILL)  # the daemon and the session serving us
    with pytest.raises(TransientStorageError) as exc:
        b.get("data/a")
    assert_one_line(exc)
    with pytest.raises(TransientStorageError):  # still down: reconnect refused
        b.put("data/b", b"x")
    own_sshd.start()
    assert b.get("data/a") == b"before"
    b.put("data/b", b"after")
    assert {i.name for i in b.list("data")} == {"data/a", "data/b"}
    b.close()


@pytest.mark.sftp
def test_sftp_no_credentials_at_all(
    sshd_server: SSHServer, sftp_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* keys
    url = f"sftp://root@{HOST}:{sshd_server.port}/x?known_hosts={sshd_server.known_hosts}"
    with pytest.raises(AuthenticationFailed) as exc:
        open_backend(url).get("a")
    assert_one_line(exc)


@pytest.mark.sftp
def test_sftp_hanging_server_times_out(hanging_endpoint: str, sftp_env: None) -> None:
    port = hanging_endpoint.rsplit(":", 1)[1]
    b = retrying(open_backend(f"sftp://root@{HOST}:{port}/x?timeout=0.3"), attempts=2)
    with pytest.raises(TransientStorageError) as exc:
        b.get("a")
    assert_one_line(exc)


@pytest.mark.sftp
def test_sftp_create_under_a_file_fails_clearly(sshd_server: SSHServer, sftp_env: None) -> None:
    blocker = sshd_server.data_dir / "blocker"
    blocker.write_text("a file, not a directory")
    b = open_backend(sshd_server.url(f"{blocker}/repo"))
    with pytest.raises(StorageError, match="not a directory") as exc:
        b.create()
    assert type(exc.value) is StorageError
    b.close()
