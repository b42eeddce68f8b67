"""Issue 14, item 6: credentials in URLs are never printed (endpoint in the query,
VMDR_S3_ENDPOINT, proxies), in errors, warnings or log lines."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmdr.cli.main import _RedactingFilter
from vmdr.errors import StorageError
from vmdr.storage.registry import open_backend, redact, redact_text

from .hardening_helpers import vmdr

SECRET = "s3cr3tpw"


@pytest.mark.parametrize(("url", "shown"), [
    (f"s3://b/p?endpoint=http://user:{SECRET}@host:9000&region=x",
     "s3://b/p?endpoint=http://user:***@host:9000&region=x"),
    (f"sftp://u:{SECRET}@h:22/x", "sftp://u:***@h:22/x"),
    (f"https://h/x?X-Amz-Signature={SECRET}&a=1", "https://h/x?X-Amz-Signature=***&a=1"),
    (f"https://h/hook?token={SECRET}", "https://h/hook?token=***"),
    ("s3://b/p?endpoint=http://host:9000", "s3://b/p?endpoint=http://host:9000"),
    ("/plain/path", "/plain/path"),
    ("qemu:///system", "qemu:///system"),  # an empty authority stays
    ("qemu+ssh://root@dr1/system?keyfile=/k", "qemu+ssh://root@dr1/system?keyfile=/k"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_redact_text() -> None:
    msg = (f'Could not connect to the endpoint URL: "http://user:{SECRET}@127.0.0.1:1/b" '
           f"via proxy http://p:{SECRET}@proxy:3128")
    assert SECRET not in redact_text(msg)
    assert "http://user:***@127.0.0.1:1/b" in redact_text(msg)


@pytest.mark.parametrize("how", ["query", "env"])
def test_s3_errors_hide_the_endpoint_password(monkeypatch: pytest.MonkeyPatch,
                                              how: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    endpoint = f"http://user:{SECRET}@127.0.0.1:1"
    if how == "env":
        monkeypatch.setenv("VMDR_S3_ENDPOINT", endpoint)
        url = "s3://bucket/prefix?timeout=2"
    else:
        url = f"s3://bucket/prefix?timeout=2&endpoint={endpoint}"
    b = open_backend(url)  # unwrapped: one attempt, no retries
    try:
        assert SECRET not in b.display_url and SECRET not in repr(b)
        with pytest.raises(StorageError) as ei:
            b.get("vmdr-repo")
        assert SECRET not in ei.value.message and "127.0.0.1" in ei.value.message
        assert SECRET not in b._where()  # type: ignore[attr-defined]
    finally:
        b.close()


def test_log_lines_are_redacted() -> None:
    rec = logging.LogRecord("botocore", logging.WARNING, __file__, 1,
                            "retrying %s", (f"http://u:{SECRET}@h/x",), None)
    assert _RedactingFilter().filter(rec)
    assert SECRET not in rec.getMessage()


def test_cli_error_hides_the_endpoint_password(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "VMDR_PASSWORD": "x"}
    # a non-http(s) endpoint is a usage error (battery: global-repo-s3-endpoint-bad-scheme)
    p = vmdr("snapshots", "--repo", f"s3://b/p?endpoint=bad://user:{SECRET}@", env=env,
             code=2)
    assert SECRET not in p.stderr + p.stdout and "bad://user:***@" in p.stderr
    p = vmdr("snapshots", "--repo", "s3://b/p", env={**env,
             "VMDR_S3_ENDPOINT": f"bad://user:{SECRET}@"}, code=2)
    assert SECRET not in p.stderr + p.stdout
