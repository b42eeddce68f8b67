"""``kill -9`` at many points of image backup, image restore, copy and forget --prune, as
real processes: afterwards the repository checks clean (stale temporary objects at most),
no partial image sits under a restore's final name, and a rerun succeeds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .cli import Result, clean_env, run_vmdr
from .corrupt import age_files
from .killer import (
    Kill,
    after,
    assert_only_stale_temps,
    count_files,
    run_and_kill,
    when_allocated,
    when_files,
)

MIB = 1 << 20
BIG = 32 * MIB
# timer kill points, as fractions of an uninterrupted run (VMDR_SLOW=1: every tenth)
FRACTIONS = ([f / 10 for f in range(1, 10)] if os.environ.get("VMDR_SLOW") == "1"
             else [0.2, 0.5, 0.8])


def _image(path: Path, size: int, seed: int) -> bytes:
    """Random data with a hole in the middle (restores write it sparse)."""
    rnd = bytearray(os.urandom(size))
    rnd[size // 2 : size // 2 + 4 * MIB] = bytes(4 * MIB)
    path.write_bytes(rnd)
    return bytes(rnd)


@dataclass
class Lab:
    root: Path
    pw: Path
    config: Path
    big: Path
    base: Path
    repo: Path        # snapshots: base
    repo_big: Path    # snapshots: base, big
    dst: Path         # an empty repository (own key) for copies
    t_backup: float   # seconds one uninterrupted run took
    t_restore: float
    t_copy: float

    def env(self, repo: Path, cache: Path) -> dict[str, str]:
        return clean_env({"VMDR_REPO": str(repo), "VMDR_PASSWORD_FILE": str(self.pw),
                          "VMDR_CACHE_DIR": str(cache), "VMDR_CONFIG": str(self.config)})


def _ok(argv: list[str], env: dict[str, str]) -> Result:
    res = run_vmdr(argv, env, timeout=120)
    assert res.code == 0, res.describe()
    return res


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    _ok(argv, env)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("kill")
    pw = root / "pw"
    pw.write_text("kill nine passphrase\n")
    pw.chmod(0o600)
    config = root / "vmdr.toml"
    config.write_text("workers = 1\n")  # one worker: longer windows between kill points
    _image(root / "big.raw", BIG, 1)
    _image(root / "base.raw", 2 * MIB, 2)
    lab = Lab(root, pw, config, root / "big.raw", root / "base.raw", root / "repo",
              root / "repo-big", root / "dst", 0, 0, 0)
    env = lab.env(lab.repo, root / "cache")
    _ok(["repo", "init", "--chunk-size", "128k"], env)
    _ok(["image", "backup", str(lab.base), "--name", "base"], env)
    shutil.copytree(lab.repo, lab.repo_big)
    env_big = lab.env(lab.repo_big, root / "cache")
    lab.t_backup = _timed(["image", "backup", str(lab.big), "--name", "big"], env_big)
    lab.t_restore = _timed(["image", "restore", "big", str(root / "ref.raw")], env_big)
    _ok(["repo", "init", "--chunk-size", "128k"], lab.env(lab.dst, root / "cache"))
    probe = root / "dst-probe"
    shutil.copytree(lab.dst, probe)
    lab.t_copy = _timed(["copy", "--to", str(probe), "--workers", "1"], env_big)
    shutil.rmtree(probe)
    return lab


@pytest.fixture
def fresh(lab: Lab, tmp_path: Path) -> Iterator[Callable[[str, Path], Path]]:
    """Copy a lab repository into this test's directory."""
    def make(name: str, src: Path) -> Path:
        dest = tmp_path / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
        return dest
    yield make


def _points(t: float) -> list[tuple[str, Callable[[float], bool]]]:
    return [(f"{f:.0%} of {t:.2f}s", after(f * t)) for f in FRACTIONS]


def _snapshots(env: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in json.loads(_ok(["snapshots", "--json"], env).stdout):
        out.setdefault(s["name"], []).append(s["id"])
    return out


def _restores(env: dict[str, str], ref: str, out: Path, expected: Path) -> None:
    _ok(["image", "restore", ref, str(out), "--force"], env)
    assert out.read_bytes() == expected.read_bytes(), f"{ref}: restored content differs"
    out.unlink()


def _landed(kills: list[Kill]) -> None:
    """Most kill points must have hit a running process, or the test proves little."""
    landed = [k.at for k in kills if k.landed]
    assert len(landed) >= len(kills) // 2, f"only {landed} of {[k.at for k in kills]} " \
        "killed a running process"


# ---------------------------------------------------------------- image backup
def test_kill_image_backup(lab: Lab, fresh: Callable[[str, Path], Path], tmp_path: Path
                           ) -> None:
    points = [("first chunk", when_files(tmp_path / "it" / "data", lambda n: n >= 1)),
              ("100 chunks", when_files(tmp_path / "it" / "data", lambda n: n >= 100)),
              ("200 chunks", when_files(tmp_path / "it" / "data", lambda n: n >= 200)),
              *_points(lab.t_backup)]
    kills = []
    for i, (at, when) in enumerate(points):
        # each copy has the same repository ID: a cache per copy, or it would remember
        # chunks of the previous one (see test_corruption's rollback case)
        repo = fresh("it", lab.repo)
        env = lab.env(repo, tmp_path / f"cache{i}")
        kills.append(run_and_kill(["image", "backup", str(lab.big), "--name", "big"], env,
                                  when, at))
        assert_only_stale_temps(env, f"kill at {at}")
        snaps = _snapshots(env)
        assert set(snaps) <= {"base", "big"} and len(snaps["base"]) == 1, (at, snaps)
        _ok(["image", "backup", str(lab.big), "--name", "big"], env)  # the rerun
        assert_only_stale_temps(env, f"rerun after kill at {at}", "--read-data")
        _restores(env, "big", tmp_path / "big.out", lab.big)
        _restores(env, "base", tmp_path / "base.out", lab.base)
    _landed(kills)


# ---------------------------------------------------------------- image restore
def _same_image(path: Path, fmt: str, expected: Path) -> bool:
    if fmt == "raw":
        return path.read_bytes() == expected.read_bytes()
    p = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", str(path),
                        str(expected)], capture_output=True)
    return p.returncode == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_kill_image_restore(lab: Lab, tmp_path: Path, fmt: str) -> None:
    """Issue 14 item 5: never a partial image under the final name."""
    env = lab.env(lab.repo_big, tmp_path / "cache")
    out_dir = tmp_path / "out"
    final = out_dir / f"big.{fmt}"
    points = [("1 MiB written", when_allocated(out_dir, MIB)),
              ("16 MiB written", when_allocated(out_dir, 16 * MIB)),
              *_points(lab.t_restore)]
    kills = []
    for at, when in points:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir()
        kills.append(run_and_kill(["image", "restore", "big", str(final), "--format", fmt],
                                  env, when, at))
        if final.exists():
            assert _same_image(final, fmt, lab.big), \
                f"kill at {at}: a partial image sits under the final name {final.name}"
        else:
            _ok(["image", "restore", "big", str(final), "--format", fmt], env)  # the rerun
            assert _same_image(final, fmt, lab.big)
    assert_only_stale_temps(env, "restore kills")
    _landed(kills)


def test_kill_image_restore_force_keeps_the_old_file(lab: Lab, tmp_path: Path) -> None:
    """Should-fix of issue 14: --force keeps the old file until the new one is complete."""
    env = lab.env(lab.repo_big, tmp_path / "cache")
    final = tmp_path / "out" / "big.raw"
    final.parent.mkdir()
    kills = []
    for at, when in [("8 MiB written", when_allocated(final.parent, 8 * MIB + 2 * MIB)),
                     *_points(lab.t_restore)[1:3]]:
        shutil.copyfile(lab.base, final)
        kills.append(run_and_kill(["image", "restore", "big", str(final), "--force"], env,
                                  when, at))
        assert final.exists(), f"kill at {at}: the old file is gone and nothing replaced it"
        data = final.read_bytes()
        assert data in (lab.base.read_bytes(), lab.big.read_bytes()), \
            f"kill at {at}: {final.name} is neither the old file nor the complete new one"
        for p in final.parent.iterdir():
            if p != final:
                p.unlink()  # a leftover temporary file is allowed; the next point needs room
    _landed(kills)


# ---------------------------------------------------------------- copy
def test_kill_copy(lab: Lab, fresh: Callable[[str, Path], Path], tmp_path: Path) -> None:
    src_env = lab.env(lab.repo_big, tmp_path / "cache")
    points = [("first chunk", when_files(tmp_path / "dst" / "data", lambda n: n >= 1)),
              ("150 chunks", when_files(tmp_path / "dst" / "data", lambda n: n >= 150)),
              *_points(lab.t_copy)]
    kills = []
    for i, (at, when) in enumerate(points):
        dst = fresh("dst", lab.dst)
        src_env = lab.env(lab.repo_big, tmp_path / f"cache{i}")
        dst_env = lab.env(dst, tmp_path / f"cache{i}")
        kills.append(run_and_kill(["copy", "--to", str(dst), "--workers", "1"], src_env,
                                  when, at))
        assert_only_stale_temps(dst_env, f"copy killed at {at}")
        assert set(_snapshots(dst_env)) <= {"base", "big"}
        _ok(["copy", "--to", str(dst)], src_env)  # the rerun resumes
        assert {k: len(v) for k, v in _snapshots(dst_env).items()} == {"base": 1, "big": 1}
        assert_only_stale_temps(dst_env, f"copy rerun after {at}", "--read-data")
        _restores(dst_env, "big", tmp_path / "big.out", lab.big)
    assert_only_stale_temps(src_env, "copies")
    _landed(kills)


# ---------------------------------------------------------------- forget --prune
def test_kill_forget_prune(lab: Lab, fresh: Callable[[str, Path], Path], tmp_path: Path
                           ) -> None:
    old = tmp_path / "old.raw"
    template = tmp_path / "template"
    shutil.copytree(lab.repo, template)
    env = lab.env(template, tmp_path / "cache0")
    for seed in (3, 4):  # two older "big" snapshots whose chunks forget --prune frees
        _image(old, 12 * MIB, seed)
        _ok(["image", "backup", str(old), "--name", "big"], env)
    _ok(["image", "backup", str(lab.big), "--name", "big"], env)
    age_files(template, 7 * 3600)  # older than prune's 6 h safety window
    total = count_files(template / "data")
    t = _timed(["forget", "big", "--keep-last", "1", "--prune", "--dry-run"], env)
    data = tmp_path / "it" / "data"
    points = [("first manifest deleted",
               lambda _e: count_files(tmp_path / "it" / "snapshots") < 4),
              ("first chunk deleted", when_files(data, lambda n: n < total)),
              ("60 chunks deleted", when_files(data, lambda n: n <= total - 60)),
              ("100 chunks deleted", when_files(data, lambda n: n <= total - 100)),
              *_points(t)[:1]]
    kills = []
    for i, (at, when) in enumerate(points):
        repo = fresh("it", template)
        renv = lab.env(repo, tmp_path / f"cache{i}")
        kills.append(run_and_kill(["forget", "big", "--keep-last", "1", "--prune"], renv,
                                  when, at))
        assert_only_stale_temps(renv, f"forget --prune killed at {at}")
        _restores(renv, "big", tmp_path / "big.out", lab.big)
        _ok(["forget", "big", "--keep-last", "1", "--prune"], renv)  # the rerun
        assert {k: len(v) for k, v in _snapshots(renv).items()} == {"base": 1, "big": 1}
        assert_only_stale_temps(renv, f"rerun after {at}", "--read-data")
        _restores(renv, "base", tmp_path / "base.out", lab.base)
    _landed(kills)
