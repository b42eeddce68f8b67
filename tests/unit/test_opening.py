"""The one repository-opening function: its storage stack, its lock, its passphrase order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdr.errors import AppendOnlyViolation, WrongPassword
from vmdr.repository.opening import OpenOptions, Passphrase, open_backend_stack, open_repository
from vmdr.storage.appendonly import AppendOnlyBackend
from vmdr.storage.base import Backend
from vmdr.storage.throttle import ThrottlingBackend, TokenBucket
from vmdr.storage.wrappers import DelegatingBackend, LimitingBackend, RetryingBackend

from .repofixtures import PASS, make_repo


def _chain(b: Backend) -> list[type]:
    out = [type(b)]
    while isinstance(b, DelegatingBackend):
        b = b.inner
        out.append(type(b))
    return out


def test_the_stack_is_the_same_for_everyone(tmp_path: Path) -> None:
    make_repo(str(tmp_path / "r")).close()
    seen: list[Backend] = []

    def object_lock(raw: Backend) -> Backend:
        seen.append(raw)
        return raw

    url = str(tmp_path / "r")
    plain = open_backend_stack(OpenOptions(url), object_lock)
    assert _chain(plain)[:2] == [RetryingBackend, LimitingBackend] and seen
    ao = open_backend_stack(OpenOptions(url, append_only=True))
    assert _chain(ao)[:3] == [AppendOnlyBackend, RetryingBackend, LimitingBackend]
    # a bandwidth limit never slows a local directory
    local = open_backend_stack(OpenOptions(url, bandwidth=TokenBucket(1 << 20)))
    assert ThrottlingBackend not in _chain(local)
    for b in (plain, ao, local):
        b.close()


def test_the_declared_lock_is_held_until_close(tmp_path: Path) -> None:
    make_repo(str(tmp_path / "r")).close()
    opts = OpenOptions(str(tmp_path / "r"), lambda: PASS, append_only=True)
    locks = tmp_path / "r" / "locks"
    with open_repository(opts, "exclusive", "test") as r:
        assert len(os.listdir(locks)) == 1
        with pytest.raises(AppendOnlyViolation):
            r.backend.delete("vmdr-repo")
    assert os.listdir(locks) == []
    with open_repository(opts, None):
        assert not locks.exists() or os.listdir(locks) == []


def test_passphrase_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pw"
    f.write_text("from the file\n")
    f.chmod(0o600)
    monkeypatch.setenv("VMDR_PASSWORD", "from the environment")
    assert Passphrase(file=str(f))() == "from the environment"
    assert Passphrase(env=None, file=str(f))() == "from the file"
    monkeypatch.delenv("VMDR_PASSWORD")
    assert Passphrase(file=str(f))() == "from the file"
    calls: list[int] = []
    def fallback() -> str:
        calls.append(1)
        return "fallback"

    asked = Passphrase(fallback=fallback)
    assert asked() == asked() == "fallback" and calls == [1]  # looked up once
    with pytest.raises(WrongPassword, match=r"no passphrase: set SOMETHING$"):
        Passphrase(prompt=None, sources="SOMETHING")()
