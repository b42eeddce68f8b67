"""The tools under test for bench/run.py: one repository each, ``init``, ``backup``,
``restore`` and ``stored``, all run as separate processes under GNU time."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from _util import CommandFailed, Timed, run, timed, tree_bytes, tree_digest

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
PASSPHRASE = "bench: correct horse battery staple 2026"  # a real passphrase, real KDF
CHUNK = 4 << 20


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VMDR_", "BORG_", "RESTIC_"))}
    env.update(extra)
    return env


class Tool:
    """One repository of one tool: ``init``, ``backup``, ``restore``, ``stored``."""

    name = ""

    def __init__(self, base: Path, image: Path) -> None:
        self.base, self.image = base, image
        self.repo, self.cache = base / "repo", base / "cache"
        shutil.rmtree(base, ignore_errors=True)
        self.cache.mkdir(parents=True)
        self.env = self.make_env()
        self.last: dict[str, object] = {}

    def make_env(self) -> dict[str, str]:
        raise NotImplementedError

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, label: str, force_read: bool = False) -> Timed:
        raise NotImplementedError

    def restore(self, out: Path) -> tuple[Timed, Path]:
        raise NotImplementedError

    def stored(self) -> int:
        return tree_bytes(self.repo)

    def drop(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class Vmdr(Tool):
    name = "vmdr"
    level: int | None = None
    exe = str(Path(sys.executable).parent / "vmdr")
    code = ""  # PYTHONPATH of the copy of src/vmdr under test (see freeze_vmdr)
    force_read = False  # does `vmdr image backup` know --force-read?

    def make_env(self) -> dict[str, str]:
        # the real default argon2id on init and every open (no test hook on PYTHONPATH)
        return clean_env(VMDR_PASSWORD=PASSPHRASE, VMDR_CACHE_DIR=str(self.cache),
                         PYTHONPATH=self.code)

    def init(self) -> None:
        lvl = [] if self.level is None else ["--compression-level", str(self.level)]
        run([self.exe, "repo", "init", "-r", str(self.repo), *lvl, "--json"], self.env)

    def backup(self, label: str, force_read: bool = False) -> Timed:
        extra = ["--force-read"] if force_read else []
        t = timed([self.exe, "image", "backup", str(self.image), "--name", "bench", *extra,
                   "-r", str(self.repo), "--json", "--no-progress"], self.env)
        self.last = json.loads(t.stdout)
        return t

    def restore(self, out: Path) -> tuple[Timed, Path]:
        dest = out / self.image.name
        return timed([self.exe, "image", "restore", "bench", str(dest), "-r", str(self.repo),
                      "--format", "raw", "--force", "--json", "--no-progress"], self.env), dest


class Borg(Tool):
    name = "borg"

    def make_env(self) -> dict[str, str]:
        return clean_env(BORG_PASSPHRASE=PASSPHRASE, BORG_BASE_DIR=str(self.cache),
                         BORG_DISPLAY_PASSPHRASE="no")

    def init(self) -> None:
        run(["borg", "init", "--encryption", "repokey-blake2", str(self.repo)], self.env)

    def backup(self, label: str, force_read: bool = False) -> Timed:
        extra = ["--files-cache", "disabled"] if force_read else []
        return timed(["borg", "create", "--compression", "zstd,3", "--chunker-params",
                      f"fixed,{CHUNK}", *extra, f"{self.repo}::{label}", self.image.name],
                     self.env, cwd=self.image.parent)

    def restore(self, out: Path) -> tuple[Timed, Path]:
        return (timed(["borg", "extract", f"{self.repo}::a1", self.image.name], self.env,
                      cwd=out), out / self.image.name)


class Restic(Tool):
    name = "restic"

    def make_env(self) -> dict[str, str]:
        return clean_env(RESTIC_PASSWORD=PASSPHRASE, RESTIC_CACHE_DIR=str(self.cache))

    def init(self) -> None:
        run(["restic", "-r", str(self.repo), "init", "--repository-version", "2"], self.env)

    def backup(self, label: str, force_read: bool = False) -> Timed:
        extra = ["--force"] if force_read else []
        return timed(["restic", "-r", str(self.repo), "backup", "-q", "--host", "bench",
                      "--tag", label, *extra, str(self.image)], self.env)

    def restore(self, out: Path) -> tuple[Timed, Path]:
        t = timed(["restic", "-r", str(self.repo), "restore", "latest", "--target", str(out)],
                  self.env)
        return t, out / str(self.image).lstrip("/")


def freeze_vmdr() -> str:
    """Copy src/vmdr aside and test that copy for the whole run, so edits others make to
    the working tree meanwhile cannot change (or break) vmdr between rounds."""
    dest = WORK / "vmdr-under-test"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT / "src" / "vmdr", dest / "vmdr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    Vmdr.code = str(dest)
    env = clean_env(PYTHONPATH=Vmdr.code)
    try:
        where = run([sys.executable, "-c", "import vmdr; print(vmdr.__file__)"], env).strip()
        helptext = run([Vmdr.exe, "image", "backup", "--help"], env)
    except CommandFailed as exc:
        raise SystemExit(f"vmdr in the working tree does not start:\n{exc}") from None
    if not where.startswith(str(dest)):
        raise SystemExit(f"PYTHONPATH did not select the frozen copy (got {where})")
    Vmdr.force_read = "--force-read" in helptext
    return tree_digest(dest / "vmdr")


def vmdr_at(level: int) -> type[Vmdr]:
    return type(f"Vmdr{level}", (Vmdr,), {"level": level, "name": f"vmdr-l{level}"})


KINDS: dict[str, type[Tool]] = {"vmdr": Vmdr, "borg": Borg, "restic": Restic}
