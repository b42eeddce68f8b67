"""Repositories written by format version 1 must stay readable, byte-exact, forever."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from vmdr.jobs import diskcopy
from vmdr.repository.check import check
from vmdr.repository.repo import Repository
from vmdr.storage.file import FileBackend

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "repo-v1"
IMAGE_SHA256 = "bef6486e806b97f5423f4bfdd0b4e6097fa48cd167a4e2b606cb4c7d64862289"


@pytest.mark.parametrize("kind", ["aes-256-gcm", "none"])
def test_v1_fixture_restores_byte_exact(kind: str, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    shutil.copytree(FIXTURES / kind, repo_dir)  # never touch the committed copy
    repo = Repository.open(FileBackend(str(repo_dir)), passphrase=lambda: "fixture")
    assert repo.config.encryption == kind
    snap = repo.resolve("fixture-vm")
    assert snap.tags == ["v1"] and repo.is_protected(snap.id)
    assert check(repo, read_data=1.0).ok
    out = tmp_path / "out.raw"
    diskcopy.restore(repo, snap.disks[0], str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == IMAGE_SHA256
