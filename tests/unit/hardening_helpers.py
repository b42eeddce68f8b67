"""Shared by the test_hardening_* tests: a repository with snapshots made at chosen
times (through the library), and the CLI run as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository

from .repofixtures import PASS, make_image, make_repo

VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def cli_env(tmp_path: Path) -> dict[str, str]:
    pw = tmp_path / "pw"
    pw.write_text(PASS + "\n")
    pw.chmod(0o600)
    return {"VMDR_REPO": str(tmp_path / "repo"), "VMDR_PASSWORD_FILE": str(pw)}


def vmdr(*args: str, env: dict[str, str], code: int | None = 0,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real CLI; assert the exit code, no traceback, and one error line."""
    e = dict(os.environ)
    e.update(env)
    p = subprocess.run([*VMDR, *args], capture_output=True, text=True, env=e,
                       timeout=timeout)
    if code is not None:
        assert p.returncode == code, f"exit {p.returncode} != {code}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "internal error" not in p.stderr, p.stderr
    if code:
        errs = [ln for ln in p.stderr.splitlines() if " error: " in ln or
                ln.startswith("vmdr: error")]
        assert len(errs) == 1, p.stderr
    return p


def empty_snapshot(repo: Repository, name: str, t: datetime) -> Snapshot:
    s = Snapshot(name, t, repo.chunk_size, tags=[])
    repo.save_snapshot(s)
    return s


def image_snapshot(repo: Repository, tmp_path: Path, name: str, seed: int,
                   size: int = 1 << 20) -> tuple[Snapshot, bytes]:
    """Back up a small random image as *name*; return the snapshot and its content."""
    from vmdr.jobs.image import backup_image

    img = tmp_path / f"src-{name}-{seed}.raw"
    content = make_image(str(img), size, seed=seed)
    res = backup_image(repo, str(img), name)
    return res.snapshot, content


__all__ = ["PASS", "cli_env", "empty_snapshot", "image_snapshot", "make_repo", "vmdr"]
