"""Test-wide settings: cheap key slots (in subprocesses too), a private cache dir and the
slow-test switch."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Cheap key slots, in this process and in every vmdr process the tests start (through
# PYTHONPATH: tests/kdfhook/sitecustomize.py). Production code has no such switch.
_KDFHOOK = str(Path(__file__).resolve().parent / "kdfhook")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_KDFHOOK, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
sys.path.insert(0, _KDFHOOK)
import vmdr_test_kdf  # noqa: E402

vmdr_test_kdf.install()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("VMDR_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set VMDR_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("VMDR_REPO", raising=False)
    monkeypatch.delenv("VMDR_PASSWORD", raising=False)
    monkeypatch.delenv("VMDR_PASSWORD_FILE", raising=False)
    monkeypatch.delenv("VMDR_CONFIG", raising=False)
    yield


@pytest.fixture(autouse=True, scope="module")
def _no_lingering_ssh_masters() -> Iterator[None]:
    """Replica cycles leave a shared ssh master up for VMDR_SSH_PERSIST idle seconds (as
    they should for the agent); a test module stops the ones it started in this network
    namespace, so no master outlives the sshd it logged in to."""
    yield
    from vmdr.hypervisor import ssh_mux

    ssh_mux.stop_masters()
