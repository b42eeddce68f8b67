"""Test-wide settings: cheap KDF, a private cache dir, and the slow-test switch."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ["VMDR_INSECURE_TEST_KDF"] = "1"


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
