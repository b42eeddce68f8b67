"""``Repository.commit_snapshot``: a prune that runs while a backup runs (locks broken by
hand) can never leave a snapshot pointing at a chunk it deleted (format.md §9)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vmdr.errors import IntegrityError
from vmdr.jobs.image import backup_image
from vmdr.repository.check import check
from vmdr.repository.prune import prune
from vmdr.repository.repo import GENERATION_NAME, Repository
from vmdr.storage.file import FileBackend
from vmdr.storage.wrappers import DelegatingBackend

from .repofixtures import PASS, make_image, make_repo, reopen

SRC = Path(__file__).resolve().parents[2] / "src" / "vmdr"


class PruneAt(DelegatingBackend):
    """Runs *action* once, just before the first matching call after ``arm``."""

    def __init__(self, inner: FileBackend) -> None:
        super().__init__(inner)
        self.when: Callable[[str, str], bool] | None = None
        self.action: Callable[[], None] = lambda: None

    def arm(self, when: Callable[[str, str], bool], action: Callable[[], None]) -> None:
        self.when, self.action = when, action

    def _fire(self, op: str, name: str) -> None:
        if self.when is not None and self.when(op, name):
            self.when = None
            self.action()

    def get(self, name: str) -> bytes:
        self._fire("get", name)
        return super().get(name)

    def put(self, name: str, data: bytes) -> None:
        self._fire("put", name)
        super().put(name, data)


def _age_chunks(path: str) -> None:
    old = time.time() - 7 * 3600  # past the safety window
    for root, _, files in os.walk(os.path.join(path, "data")):
        for f in files:
            os.utime(os.path.join(root, f), (old, old))


def _forget_and_prune(path: str, name: str) -> Callable[[], None]:
    def run() -> None:
        with reopen(path) as other:
            for s in other.list_snapshots(name):
                other.delete_snapshot(s.id)
            assert prune(other).deleted > 0
    return run


def _setup(tmp_path: Path) -> tuple[str, str, Repository, PruneAt]:
    path = str(tmp_path / "r")
    make_image(str(tmp_path / "a.raw"), 1 << 20, seed=5)
    shutil.copy(tmp_path / "a.raw", tmp_path / "b.raw")  # b reuses every chunk of a
    with make_repo(path) as repo:
        backup_image(repo, str(tmp_path / "a.raw"), "a")
    _age_chunks(path)
    backend = PruneAt(FileBackend(path))
    return path, str(tmp_path / "b.raw"), Repository.open(backend, passphrase=lambda: PASS), \
        backend


@pytest.mark.parametrize("moment", ["before the commit", "while the manifest is written"])
def test_a_concurrent_prune_never_leaves_a_dangling_snapshot(tmp_path: Path,
                                                            moment: str) -> None:
    path, b_raw, repo, backend = _setup(tmp_path)
    if moment == "before the commit":  # the commit's first look at the generation
        backend.arm(lambda op, name: op == "get" and name == GENERATION_NAME,
                    _forget_and_prune(path, "a"))
    else:  # after the re-check found nothing to check, before the manifest lands
        backend.arm(lambda op, name: op == "put" and name.startswith("snapshots/"),
                    _forget_and_prune(path, "a"))
    with repo, pytest.raises(IntegrityError, match=r"concurrent prune removed .* --force-read"):
        backup_image(repo, b_raw, "b")
    with reopen(path) as after:
        assert after.list_snapshots() == []  # nothing committed, nothing dangling
        assert check(after).ok
    with reopen(path) as again:  # and a new run stores the chunks again
        res = backup_image(again, b_raw, "b")
        assert res.stats["chunks_new"] > 0
        assert check(again, read_data=1.0).ok


def test_a_prune_that_spared_the_reused_chunks_lets_the_commit_through(tmp_path: Path) -> None:
    path, b_raw, repo, backend = _setup(tmp_path)
    make_image(str(tmp_path / "c.raw"), 1 << 20, seed=6)
    with reopen(path) as other:
        backup_image(other, str(tmp_path / "c.raw"), "c")
    _age_chunks(path)
    backend.arm(lambda op, name: op == "get" and name == GENERATION_NAME,
                _forget_and_prune(path, "c"))
    with repo:
        res = backup_image(repo, b_raw, "b")
        assert res.stats["chunks_new"] == 0
    with reopen(path) as after:
        assert {s.name for s in after.list_snapshots()} == {"a", "b"}
        assert check(after, read_data=1.0).ok


def test_every_backup_job_commits_through_the_repository() -> None:
    """No job writes a manifest itself: they all call ``commit_snapshot``."""
    for job in ("image.py", "vmbackup.py"):
        assert "commit_snapshot(" in (SRC / "jobs" / job).read_text()
    for path in SRC.rglob("*.py"):
        if path.parts[-2] != "repository":
            assert not re.search(r"\.save_snapshot\(", path.read_text()), path


def test_only_the_repository_knows_the_layout() -> None:
    """Object names and raw backend calls stay inside repository/ (and storage/)."""
    name = re.compile(r"""["'](snapshots|attachments|data|keys|locks|state)/""")
    raw = re.compile(r"\.backend\.(get|put|list|delete|exists|stat|get_range)\(")
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).parts[0] in ("repository", "storage"):
            continue
        text = path.read_text()
        assert not name.search(text), f"{path} builds repository object names"
        assert not raw.search(text), f"{path} calls the repository's backend directly"
