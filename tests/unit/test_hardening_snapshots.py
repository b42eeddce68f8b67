"""Issue 14, items 2-4: one damaged manifest never hides the others, the cache never
hides damage, and a snapshot reference never resolves to another name's snapshot."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from vmdr.errors import IntegrityError, SnapshotNotFound, UsageError
from vmdr.repository.manifest import Snapshot
from vmdr.repository.resolve import MIN_ID_PREFIX, resolve_ref

from .hardening_helpers import cli_env, image_snapshot, make_repo, vmdr
from .repofixtures import FakeClock, reopen

# the fixture `three`: environment, snapshots, their contents
Three = tuple[dict[str, str], list[Snapshot], list[bytes]]


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


def test_damaged_manifest_with_empty_cache(tmp_path: Path, three: Three) -> None:
    env, snaps, contents = three
    bad = snaps[1]
    _damage(env, bad.id)
    env = _cold(env, tmp_path)
    p = vmdr("snapshots", "--json", env=env)
    assert sorted(s["id"] for s in json.loads(p.stdout)) == sorted([snaps[0].id, snaps[2].id])
    assert bad.id in p.stderr and "damaged" in p.stderr
    # undamaged snapshots restore by name and by ID; "web" (latest) is now web@1, with a
    # warning that a damaged snapshot may be newer
    p = vmdr("image", "restore", "web", str(tmp_path / "web.raw"), env=env)
    assert "newest readable" in p.stderr and snaps[0].id[:8] in p.stdout
    vmdr("image", "restore", "db", str(tmp_path / "db.raw"), env=env)
    assert (tmp_path / "db.raw").read_bytes() == contents[2]
    vmdr("image", "restore", snaps[0].id[:12], str(tmp_path / "w1.raw"), env=env)
    assert (tmp_path / "w1.raw").read_bytes() == contents[0]
    vmdr("image", "restore", f"web@{snaps[0].id[:8]}", str(tmp_path / "w1b.raw"), env=env)
    # the damaged one is named, not "not found"
    p = vmdr("image", "restore", bad.id[:12], str(tmp_path / "bad.raw"), env=env, code=6)
    assert bad.id in p.stderr and not (tmp_path / "bad.raw").exists()
    p = vmdr("check", env=env, code=6)
    assert bad.id in p.stdout and "corrupt-snapshot" in p.stdout
    # prune refuses to guess which chunks the damaged one uses
    chunks = sum(len(fs) for _, _, fs in os.walk(Path(env["VMDR_REPO"]) / "data"))
    p = vmdr("prune", "--safety-window", "0", env=env, code=6)
    assert bad.id in p.stderr and "nothing deleted" in p.stderr
    assert sum(len(fs) for _, _, fs in os.walk(Path(env["VMDR_REPO"]) / "data")) == chunks


@pytest.mark.parametrize("args", [[], ["--read-data"]])
def test_warm_cache_does_not_hide_damage(tmp_path: Path, three: Three,
                                         args: list[str]) -> None:
    env, snaps, _ = three
    vmdr("snapshots", env=env)  # fill the cache
    vmdr("check", *args, env=env)
    _damage(env, snaps[2].id)
    p = vmdr("check", *args, env=env, code=6)
    assert snaps[2].id in p.stdout
    p = vmdr("verify", f"db@{snaps[2].id[:8]}", "--no-record", env=env, code=16)
    assert "corrupt-snapshot" in p.stdout


def test_poisoned_cache_entry_is_not_trusted(tmp_path: Path, three: Three) -> None:
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


def _s(name: str, sid: str, minute: int = 0) -> Snapshot:
    from datetime import UTC, datetime

    s = Snapshot(name, datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minute), 65536)
    s.id = sid
    return s


SNAPS = [_s("web", "ec884b32" + "0" * 56, 1), _s("web", "ec884b99" + "1" * 56, 2),
         _s("othervm", "ec88aaaa" + "2" * 56, 3), _s("db", "1234abcd" + "3" * 56, 4),
         _s("abcd", "9999" + "4" * 60, 5)]


def test_resolver_rules() -> None:
    assert resolve_ref("web", SNAPS) is SNAPS[1]
    assert resolve_ref("web@latest", SNAPS) is SNAPS[1]
    assert resolve_ref("web@ec884b32", SNAPS) is SNAPS[0]
    assert resolve_ref("web@EC884B32", SNAPS) is SNAPS[0]
    assert resolve_ref("1234abcd", SNAPS) is SNAPS[3]
    assert resolve_ref("abcd", SNAPS) is SNAPS[4]  # a name wins over an ID prefix
    assert resolve_ref("othervm@ec88", SNAPS) is SNAPS[2]
    # NAME@ID never leaves NAME
    with pytest.raises(SnapshotNotFound, match="no snapshot named 'typo'"):
        resolve_ref("typo@ec88aaaa", SNAPS)
    with pytest.raises(SnapshotNotFound):
        resolve_ref("db@ec88aaaa", SNAPS)
    # ambiguity lists the candidates
    with pytest.raises(UsageError, match=r"ambiguous.*web@ec884b320000.*web@ec884b991111"):
        resolve_ref("web@ec88", SNAPS)
    with pytest.raises(UsageError, match="othervm@ec88aaaa"):
        resolve_ref("ec88", SNAPS)
    # too short, not hex, nothing after @, empty
    with pytest.raises(UsageError, match=f"at least {MIN_ID_PREFIX}"):
        resolve_ref("ec8", SNAPS)
    with pytest.raises(UsageError, match=f"at least {MIN_ID_PREFIX}"):
        resolve_ref("web@e", SNAPS)
    with pytest.raises(UsageError, match="hexadecimal"):
        resolve_ref("web@zzzz", SNAPS)
    with pytest.raises(UsageError, match="ends in '@'"):
        resolve_ref("web@", SNAPS)
    with pytest.raises(UsageError):
        resolve_ref("", SNAPS)
    with pytest.raises(UsageError):
        resolve_ref("@ec88", SNAPS)
    # a damaged manifest is named when a reference reaches it
    with pytest.raises(IntegrityError, match="ffff0000"):
        resolve_ref("ffff", SNAPS, {"ffff0000" + "5" * 56: "MAC check failed"})
    # a legacy name holding '@' is split at the last '@'
    legacy = [_s("a@b", "5555" + "6" * 60)]
    assert resolve_ref("a@b@5555", legacy) is legacy[0]
    assert resolve_ref("5555", legacy) is legacy[0]


def test_cli_typo_name_never_restores_another_vm(tmp_path: Path, three: Three) -> None:
    env, snaps, _ = three
    out = tmp_path / "out.raw"
    p = vmdr("image", "restore", f"typo@{snaps[2].id[:4]}", str(out), env=env, code=14)
    assert "typo" in p.stderr and not out.exists()
    vmdr("image", "restore", "web@", str(out), env=env, code=2)
    vmdr("image", "restore", "web@ab", str(out), env=env, code=2)
    assert not out.exists()


def test_repository_resolve_uses_the_resolver(tmp_path: Path) -> None:
    clock = FakeClock()
    with make_repo(str(tmp_path / "r"), clock=clock) as r:
        a = Snapshot("a", clock(), r.chunk_size)
        r.save_snapshot(a)
        clock.advance(hours=1)
        b = Snapshot("b", clock(), r.chunk_size)
        r.save_snapshot(b)
        with pytest.raises(SnapshotNotFound):
            r.resolve(f"a@{b.id[:8]}")
        with pytest.raises(UsageError):
            r.resolve("a@")
        assert r.resolve(f"b@{b.id[:8]}").id == b.id
