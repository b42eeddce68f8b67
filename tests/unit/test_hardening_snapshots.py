"""Issue 14, items 2-3: one damaged manifest never hides the others, and the cache never
hides damage."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from vmdr.repository.manifest import Snapshot

from .hardening_helpers import cli_env, image_snapshot, make_repo, vmdr
from .repofixtures import reopen


@pytest.fixture
def three(tmp_path: Path) -> tuple[dict[str, str], list[Snapshot], list[bytes]]:
    """web@1, web@2 and db@1 (small image snapshots); the CLI env for them."""
    env = cli_env(tmp_path)
    snaps, contents = [], []
    with make_repo(env["VMDR_REPO"]) as r:
        for name, seed in (("web", 1), ("web", 2), ("db", 3)):
            s, c = image_snapshot(r, tmp_path, name, seed, size=256 << 10)
            snaps.append(s)
            contents.append(c)
    return env, snaps, contents


def _damage(env: dict[str, str], sid: str) -> None:
    p = Path(env["VMDR_REPO"]) / "snapshots" / sid
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    p.write_bytes(bytes(blob))


def _cold(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    cold = tmp_path / "cold-cache"
    cold.mkdir(exist_ok=True)
    return {**env, "VMDR_CACHE_DIR": str(cold)}


def test_damaged_manifest_with_empty_cache(tmp_path: Path, three: tuple) -> None:
    env, snaps, contents = three
    bad = snaps[1]
    _damage(env, bad.id)
    env = _cold(env, tmp_path)
    p = vmdr("snapshots", "--json", env=env)
    assert sorted(s["id"] for s in json.loads(p.stdout)) == sorted([snaps[0].id, snaps[2].id])
    assert bad.id in p.stderr and "damaged" in p.stderr
    # undamaged snapshots restore by name and by ID; "web" (latest) is now web@1
    vmdr("image", "restore", "db", str(tmp_path / "db.raw"), env=env)
    assert (tmp_path / "db.raw").read_bytes() == contents[2]
    vmdr("image", "restore", snaps[0].id[:12], str(tmp_path / "w1.raw"), env=env)
    assert (tmp_path / "w1.raw").read_bytes() == contents[0]
    vmdr("image", "restore", f"web@{snaps[0].id[:8]}", str(tmp_path / "w1b.raw"), env=env)
    p = vmdr("check", env=env, code=6)
    assert bad.id in p.stdout and "corrupt-snapshot" in p.stdout


@pytest.mark.parametrize("args", [[], ["--read-data"]])
def test_warm_cache_does_not_hide_damage(tmp_path: Path, three: tuple,
                                         args: list[str]) -> None:
    env, snaps, _ = three
    vmdr("snapshots", env=env)  # fill the cache
    vmdr("check", *args, env=env)
    _damage(env, snaps[2].id)
    p = vmdr("check", *args, env=env, code=6)
    assert snaps[2].id in p.stdout
    p = vmdr("verify", f"db@{snaps[2].id[:8]}", "--no-record", env=env, code=16)
    assert "corrupt-snapshot" in p.stdout


def test_poisoned_cache_entry_is_not_trusted(tmp_path: Path, three: tuple) -> None:
    env, snaps, _ = three
    with reopen(env["VMDR_REPO"]) as r:
        r.list_snapshots()
        db_path = r.cache.path if r.cache else ""
    # swap two cached manifests: a cache that lies about what a snapshot holds
    db = sqlite3.connect(db_path)
    a = db.execute("SELECT data FROM snaps WHERE id=?", (snaps[0].id,)).fetchone()[0]
    db.execute("UPDATE snaps SET data=? WHERE id=?", (a, snaps[2].id))
    db.commit()
    db.close()
    with reopen(env["VMDR_REPO"]) as r:
        assert r.load_snapshot(snaps[2].id).name == "db"
