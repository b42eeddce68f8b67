"""Unit tests of the storage wrappers (retry, concurrency limit), the fault injector and
the scheme registry, on a local FileBackend: no network, no sleeping."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdr.errors import (
    AuthenticationFailed,
    NoSpace,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UsageError,
    VmdrError,
)
from vmdr.storage import registry
from vmdr.storage.base import Backend, ObjectInfo
from vmdr.storage.faulty import Fault, FaultyBackend
from vmdr.storage.file import FileBackend
from vmdr.storage.wrappers import LimitingBackend, RetryingBackend, wrap


class _MaxRng:
    """A stand-in ``random.Random`` whose ``uniform`` always returns the upper bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
def faulty(tmp_path: Path) -> FaultyBackend:
    inner = FileBackend(str(tmp_path / "repo"))
    inner.create()
    inner.put("data/a", b"A")
    return FaultyBackend(inner)


def retrying(inner: Backend, sleeps: list[float], attempts: int = 4) -> RetryingBackend:
    return RetryingBackend(inner, attempts=attempts, base_delay=0.5, max_delay=3.0,
                           sleep=sleeps.append, rng=_MaxRng())  # type: ignore[arg-type]


# -- RetryingBackend --------------------------------------------------------------------


def test_transient_errors_are_retried_until_success(faulty: FaultyBackend) -> None:
    faulty.add(Fault("get", "data/*", TransientStorageError("timeout"), times=2))
    sleeps: list[float] = []
    assert retrying(faulty, sleeps).get("data/a") == b"A"
    assert faulty.calls == [("get", "data/a")] * 3
    assert sleeps == [1.0, 2.0]  # base * 2**attempt, full jitter at its maximum


def test_backoff_is_capped(faulty: FaultyBackend) -> None:
    faulty.add(Fault("stat", error=TransientStorageError("busy"), times=5))
    sleeps: list[float] = []
    assert retrying(faulty, sleeps, attempts=6).stat("data/a").size == 1
    assert sleeps == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_gives_up_after_the_last_attempt(faulty: FaultyBackend) -> None:
    faulty.add(Fault("put", error=TransientStorageError("connection reset")))
    sleeps: list[float] = []
    with pytest.raises(TransientStorageError, match="connection reset"):
        retrying(faulty, sleeps, attempts=4).put("data/b", b"B")
    assert len(faulty.calls) == 4
    assert len(sleeps) == 3
    assert not faulty.inner.exists("data/b")


@pytest.mark.parametrize(
    "error",
    [ObjectNotFound("gone"), AuthenticationFailed("denied"), NoSpace("full"),
     StorageError("permission denied"), UsageError("bad name")],
)
def test_permanent_errors_are_not_retried(faulty: FaultyBackend, error: VmdrError) -> None:
    faulty.add(Fault("*", error=error))
    sleeps: list[float] = []
    with pytest.raises(type(error)):
        retrying(faulty, sleeps).get("data/a")
    assert len(faulty.calls) == 1
    assert sleeps == []


def test_listing_is_retried_as_a_whole(faulty: FaultyBackend) -> None:
    faulty.add(Fault("list", error=TransientStorageError("dropped"), times=1))
    sleeps: list[float] = []
    assert [i.name for i in retrying(faulty, sleeps).list("data")] == ["data/a"]
    assert len(sleeps) == 1


def test_retry_passes_results_through(faulty: FaultyBackend) -> None:
    b = retrying(faulty, [])
    assert b.display_url == faulty.display_url
    assert b.put_if_absent("data/a", b"other") is False
    assert b.put_if_absent("data/n", b"N") is True
    assert b.get_range("data/n", 0, 5) == b"N"
    assert b.exists("data/n")
    b.delete("data/n")
    assert not b.exists("data/n")


# -- LimitingBackend --------------------------------------------------------------------


class _Gate(Backend):
    """A backend whose ``get`` blocks until released, counting calls in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def get(self, name: str) -> bytes:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        self.release.wait(10)
        with self._lock:
            self.in_flight -= 1
        return name.encode()

    def create(self) -> None:
        raise NotImplementedError

    def put(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def stat(self, name: str) -> ObjectInfo:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError


def test_limiting_never_exceeds_the_limit() -> None:
    gate = _Gate()
    limited = LimitingBackend(gate, limit=3)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: results.append(limited.get(f"o{i}")))
               for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while gate.in_flight < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # give any excess caller the chance to get through
    assert gate.in_flight == 3
    gate.release.set()
    for t in threads:
        t.join(10)
    assert gate.peak == 3
    assert sorted(results) == sorted(f"o{i}".encode() for i in range(10))


def test_wrap_stacks_retry_outside_limit(faulty: FaultyBackend) -> None:
    b = wrap(faulty, connections=2)
    assert isinstance(b, RetryingBackend)
    assert isinstance(b.inner, LimitingBackend)
    assert b.get("data/a") == b"A"


# -- FaultyBackend ----------------------------------------------------------------------


def test_fault_after_and_times(faulty: FaultyBackend) -> None:
    faulty.add(Fault("get", "data/*", ObjectNotFound("injected"), times=1, after=1))
    assert faulty.get("data/a") == b"A"  # first matching call passes
    with pytest.raises(ObjectNotFound, match="injected"):
        faulty.get("data/a")
    assert faulty.get("data/a") == b"A"  # fired once only


def test_fault_pattern_method_and_callback(faulty: FaultyBackend) -> None:
    seen: list[str] = []
    faulty.add(Fault("put", "locks/*", callback=seen.append))
    faulty.add(Fault("*", "index/*", StorageError("broken index")))
    faulty.put("locks/l1", b"x")
    faulty.put("data/b", b"y")
    assert seen == ["locks/l1"]
    with pytest.raises(StorageError):
        faulty.stat("index/1")
    with pytest.raises(StorageError):
        faulty.put("index/1", b"z")
    assert not faulty.inner.exists("index/1")  # the fault fired before the real call
    assert ("put", "data/b") in faulty.calls


# -- registry ---------------------------------------------------------------------------


def test_duplicate_scheme_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_SCHEMES", dict(registry._SCHEMES))
    registry.register("mem-test", lambda parts: FileBackend("/x"), "test")
    with pytest.raises(ValueError, match="twice"):
        registry.register("mem-test", lambda parts: FileBackend("/y"), "test")


def test_unknown_scheme() -> None:
    with pytest.raises(UsageError, match=r"unknown repository scheme 'ftp'.*file, s3, sftp"):
        registry.open_backend("ftp://host/x")


def test_builtin_schemes_are_registered() -> None:
    assert [s.name for s in registry.schemes()] == ["file", "s3", "sftp"]


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("sftp://bob:hunter2@host:2222/srv?key=/k", "sftp://bob:***@host:2222/srv?key=/k"),
        ("sftp://bob@host/srv", "sftp://bob@host/srv"),
        ("s3://:secret@bucket/p", "s3://***@bucket/p"),
        ("/plain/path", "/plain/path"),
        ("http://[::1", "<unparsable url>"),
    ],
)
def test_redact(url: str, redacted: str) -> None:
    assert registry.redact(url) == redacted


def test_plain_path_is_a_file_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    b = registry.open_backend("repo dir")
    assert isinstance(b, FileBackend)
    assert b.root == str(tmp_path / "repo dir")
    assert isinstance(registry.open_backend(f"file://{tmp_path}/r"), FileBackend)
    with pytest.raises(UsageError):
        registry.open_backend("")


def test_sftp_url_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmdr.storage.sftp import SFTPBackend

    monkeypatch.setenv("VMDR_SFTP_KEY", "/keys/id")
    b = registry.open_backend("sftp://bob:p%40ss@example.org:2222//srv/repo?timeout=5")
    assert isinstance(b, SFTPBackend)
    assert (b.host, b.port, b.username, b.root) == ("example.org", 2222, "bob", "/srv/repo")
    assert (b._password, b._key_file, b._timeout) == ("p@ss", "/keys/id", 5.0)
    assert "p%40ss" not in b.display_url and "p@ss" not in b.display_url
    monkeypatch.setenv("VMDR_SFTP_PASSWORD", "from-env")
    monkeypatch.setenv("VMDR_SFTP_KNOWN_HOSTS", "/etc/kh")
    c = registry.open_backend("sftp://alice@h/r?key=/k2")
    assert isinstance(c, SFTPBackend)
    assert (c.port, c._password, c._key_file, c._known_hosts) == (22, "from-env", "/k2", "/etc/kh")
    assert "from-env" not in c.display_url
    for bad in ("sftp:///no/host", "sftp://host", "sftp://host/", "sftp://h:port/x"):
        with pytest.raises(UsageError):
            registry.open_backend(bad)
    with pytest.raises(UsageError):
        registry.open_backend("sftp://h/x?timeout=soon")


def test_s3_url_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmdr.storage.s3 import S3Backend

    monkeypatch.setenv("VMDR_S3_ENDPOINT", "http://127.0.0.1:9")
    b = registry.open_backend("s3://my-bucket/some/prefix?region=eu-west-1&path_style=1")
    assert isinstance(b, S3Backend)
    assert (b.bucket, b.prefix, b.endpoint) == ("my-bucket", "some/prefix", "http://127.0.0.1:9")
    b.close()
    with pytest.raises(UsageError, match="credentials"):
        registry.open_backend("s3://key:secret@bucket/p")
    with pytest.raises(UsageError):
        registry.open_backend("s3://bucket/p?timeout=x")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StorageError, match="no-such-profile"):
        registry.open_backend("s3://bucket/p")


def test_backend_modules_import_their_libraries_lazily() -> None:
    code = (
        "import sys; from vmdr.storage import registry; registry.schemes(); "
        "print(sorted(m for m in ('boto3', 'botocore', 'paramiko') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
