"""Damage every kind of stored object in a real repository, then use it as a sysadmin
would: the damage is found and named with the right exit code, undamaged snapshots stay
listable and restorable, and the local cache is never trusted over the repository."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from .cli import Result, assert_clean_failure, clean_env, run_vmdr
from .corrupt import DAMAGES, chunk_ids_of, chunk_path, copy_world_repo
from .world import World, image_bytes


def fails(res: Result, code: int) -> None:
    """Damage may add ``vmdr: warning:`` lines (skipped slots, manifests) before the one
    error line."""
    assert_clean_failure(res, code, strict_one_line=False)


class Repo:
    """A damaged-to-be copy of the world's main repository and a cold cache."""

    def __init__(self, world: World, tmp: Path) -> None:
        self.world = world
        self.tmp = tmp
        self.path = copy_world_repo(world, tmp / "repo")
        self.v = world.values
        self.env = clean_env({"VMDR_REPO": str(self.path),
                              "VMDR_PASSWORD_FILE": str(world.root / "pw"),
                              "VMDR_CACHE_DIR": str(tmp / "cache")})

    def run(self, *argv: str, **env: str) -> Result:
        return run_vmdr(list(argv), {**self.env, **env}, cwd=str(self.tmp))

    def ok(self, *argv: str, **env: str) -> Result:
        res = self.run(*argv, **env)
        assert res.code == 0, res.describe()
        assert "Traceback" not in res.stderr, res.describe()
        return res

    def restores(self, ref: str, seed: int, out: str) -> None:
        """*ref* restores to exactly image_bytes(seed)."""
        self.ok("image", "restore", ref, str(self.tmp / out))
        assert (self.tmp / out).read_bytes() == image_bytes(seed), f"{ref}: wrong content"

    def snapshot_path(self, key: str) -> Path:
        return self.path / "snapshots" / self.v[key]


@pytest.fixture
def repo(world: World, tmp_path: Path) -> Repo:
    return Repo(world, tmp_path)


def _other_chunk(r: Repo, oid: str) -> Path:
    """Another chunk (of vm1@a1) to put under *oid*'s name."""
    other = chunk_ids_of(r.env, f"vm1@{r.v['a1']}")[0]
    assert other != oid
    return chunk_path(r.path, other)


# ---------------------------------------------------------------- chunks
@pytest.mark.parametrize("how", ["truncate", "empty", "flip", "flip-tag", "delete", "replace"])
def test_damaged_chunk_is_named_and_others_restore(repo: Repo, how: str) -> None:
    oid = chunk_ids_of(repo.env, f"othervm@{repo.v['o1']}")[0]  # unique to othervm
    p = chunk_path(repo.path, oid)
    DAMAGES[how](p, _other_chunk(repo, oid))

    res = repo.run("check", "--read-data")
    fails(res, 6)
    assert oid[:16] in res.stdout, res.describe()
    assert f"othervm@{repo.v['o1_8']}" in res.stdout, res.describe()
    assert f"vm1@{repo.v['a2_8']}" not in res.stdout, res.describe()
    if how == "delete":  # a structural check finds a missing chunk without reading data
        fails(repo.run("check"), 6)

    out = repo.tmp / "bad.raw"
    res = repo.run("image", "restore", f"othervm@{repo.v['o1']}", str(out))
    fails(res, 6)
    assert not out.exists(), "a failed restore left a file under its final name"
    res = repo.run("verify", f"othervm@{repo.v['o1']}", "--no-record")
    assert res.code in (6, 16) and "Traceback" not in res.stderr, res.describe()

    repo.restores(f"vm1@{repo.v['a2']}", 2, "a2.raw")
    repo.restores("vm1@" + repo.v["a3_8"], 3, "a3.raw")
    names = {s["name"] for s in json.loads(repo.ok("snapshots", "--json").stdout)}
    assert names == {"vm1", "othervm", "multi", "web"}


# ---------------------------------------------------------------- manifests
MANIFEST_DAMAGES = ["truncate", "empty", "flip", "flip-tag", "replace"]


@pytest.mark.parametrize("how", MANIFEST_DAMAGES)
def test_damaged_manifest_is_skipped_and_named(repo: Repo, how: str) -> None:
    """Issue 14 item 2: on a host with no cache, one bad manifest blocks nothing else."""
    DAMAGES[how](repo.snapshot_path("o1"), repo.snapshot_path("a1"))
    res = repo.run("snapshots", "--json")
    assert res.code in (0, 6) and "Traceback" not in res.stderr, res.describe()
    assert repo.v["o1_8"] in res.stderr, "the damaged manifest is not named\n" + res.describe()
    assert res.stdout.strip(), res.describe()
    listed = {s["id"] for s in json.loads(res.stdout)}
    assert {repo.v["a1"], repo.v["a2"], repo.v["a3"], repo.v["xtwin"]} <= listed
    assert repo.v["o1"] not in listed

    repo.restores(f"vm1@{repo.v['a2_8']}", 2, "by-id.raw")
    repo.restores("vm1@" + repo.v["a3"], 3, "by-full-id.raw")
    repo.restores(repo.v["a2"], 2, "bare-id.raw")
    repo.ok("image", "restore", "othervm", str(repo.tmp / "latest.raw"))  # xtwin, undamaged
    res = repo.run("check")
    fails(res, 6)
    assert repo.v["o1_8"] in res.stdout, res.describe()
    res = repo.run("image", "restore", f"othervm@{repo.v['o1_8']}", str(repo.tmp / "x.raw"))
    assert res.code in (6, 14) and "Traceback" not in res.stderr, res.describe()
    assert not (repo.tmp / "x.raw").exists()


def test_deleted_manifest_is_just_gone(repo: Repo) -> None:
    repo.snapshot_path("o1").unlink()
    res = repo.run("image", "restore", f"othervm@{repo.v['o1_8']}", str(repo.tmp / "x.raw"))
    fails(res, 14)
    repo.ok("check")  # its chunks are unreferenced now, not damaged
    repo.restores(f"vm1@{repo.v['a2_8']}", 2, "a2.raw")


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_warm_cache_does_not_hide_manifest_damage(repo: Repo, how: str) -> None:
    """Issue 14 item 3: check reads the repository, not what the cache remembers."""
    repo.ok("snapshots")  # fills the cache with every decoded manifest
    DAMAGES[how](repo.snapshot_path("o1"), None)
    for argv in (["check"], ["check", "--read-data"]):
        res = repo.run(*argv)
        fails(res, 6)
        assert repo.v["o1_8"] in res.stdout, res.describe()
    res = repo.run("verify", f"othervm@{repo.v['o1']}", "--no-record")
    assert res.code in (6, 14, 16), res.describe()


# ---------------------------------------------------------------- the config
@pytest.mark.parametrize("how,code", [("truncate", 3), ("empty", 3), ("delete", 3),
                                      ("flip-tag", 3)])
def test_damaged_config_is_refused(repo: Repo, how: str, code: int) -> None:
    DAMAGES[how](repo.path / "vmdr-repo", None)
    for argv in (["snapshots"], ["check"], ["image", "restore", "vm1", "o.raw"]):
        fails(repo.run(*argv), code)
    assert not (repo.tmp / "o.raw").exists()


@pytest.mark.parametrize("field,value,code", [
    ("compression_level", 9, 6), ("chunk_size", 131072, 6), ("id", "0" * 32, 4),
    ("encryption", "none", 6), ("version", 2, 7), ("format", "borg", 3),
])
def test_tampered_config_field(repo: Repo, field: str, value: object, code: int) -> None:
    """A changed field fails the MAC (6), a newer version is refused first (7); a changed
    repository ID no longer matches any key slot's associated data (4)."""
    p = repo.path / "vmdr-repo"
    doc = json.loads(p.read_text())
    doc[field] = value
    p.write_text(json.dumps(doc))
    res = repo.run("snapshots")
    fails(res, code)
    assert "hunter" not in res.stderr


def test_config_replaced_by_another_repositorys(repo: Repo, world: World) -> None:
    (repo.path / "vmdr-repo").write_bytes((world.root / "templates/repo2/vmdr-repo").read_bytes())
    fails(repo.run("snapshots"), 4)  # no key slot here opens that repo ID


# ---------------------------------------------------------------- key slots
def _slot(repo: Repo) -> Path:
    (slot,) = (repo.path / "keys").iterdir()
    return slot


def _flip_wrapped(p: Path, other: Path | None = None) -> None:
    doc = json.loads(p.read_text())
    w = doc["wrapped"]
    doc["wrapped"] = w[:4] + ("A" if w[4] != "A" else "B") + w[5:]
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("how,code", [("flip-wrapped", 4), ("delete", 4), ("truncate", 6),
                                      ("empty", 6)])
def test_damaged_only_key_slot(repo: Repo, world: World, how: str, code: int) -> None:
    {**DAMAGES, "flip-wrapped": _flip_wrapped}[how](_slot(repo), None)
    fails(repo.run("snapshots"), code)
    # the exported key file still opens it, and everything is there
    res = repo.ok("snapshots", "--json", "--key-file", str(world.root / "keyfile"),
                  VMDR_PASSWORD_FILE=str(world.root / "pw"))
    assert len(json.loads(res.stdout)) == 8


def test_slot_from_another_repository(repo: Repo, world: World) -> None:
    slot = _slot(repo)
    (other,) = (world.root / "templates/repo2/keys").iterdir()
    slot.write_bytes(other.read_bytes())
    fails(repo.run("snapshots"), 4)


@pytest.mark.parametrize("param,value", [("memory_kib", 1 << 62), ("time_cost", 1 << 62),
                                         ("parallelism", 1 << 40), ("memory_kib", -1),
                                         ("salt", "!!not base64!!"), ("name", "rot13")])
def test_tampered_kdf_parameters(repo: Repo, param: str, value: object) -> None:
    """Should-fix of issue 14: absurd KDF parameters are a clean error, not an
    OverflowError (and never an attempt to allocate 2^62 KiB)."""
    slot = _slot(repo)
    doc = json.loads(slot.read_text())
    doc["kdf"][param] = value
    slot.write_text(json.dumps(doc))
    res = run_vmdr(["snapshots"], repo.env, timeout=30)
    assert not res.timed_out, res.describe()
    assert res.code in (4, 6, 7), res.describe()
    fails(res, res.code)


def test_one_bad_slot_does_not_lock_out_the_others(repo: Repo, world: World) -> None:
    repo.ok("key", "add", "--new-password-file", str(world.root / "pw_new"))
    first = sorted((repo.path / "keys").iterdir(), key=lambda p: p.stat().st_mtime)[0]
    first.write_bytes(b"{ half a key slot")
    res = repo.run("snapshots", "--json", VMDR_PASSWORD_FILE=str(world.root / "pw_new"))
    assert res.code == 0, res.describe()


# ---------------------------------------------------------------- attachments
def _protect_attachment(repo: Repo) -> Path:
    (att,) = (repo.path / "attachments" / repo.v["a3"]).iterdir()
    return att


@pytest.mark.parametrize("how", ["truncate", "flip", "replace"])
def test_damaged_attachment(repo: Repo, how: str) -> None:
    """The protect record of vm1@a3 is damaged: check names it, restores still work,
    listing still works, and forget never removes a snapshot it cannot prove unprotected."""
    att = _protect_attachment(repo)
    other = repo.tmp / "other-att"
    if how == "replace":  # a valid attachment of another snapshot, moved here
        repo.ok("protect", f"vm1@{repo.v['a2']}")
        (other_att,) = (repo.path / "attachments" / repo.v["a2"]).iterdir()
        other.write_bytes(other_att.read_bytes())
    DAMAGES[how](att, other)
    repo.restores(f"vm1@{repo.v['a3']}", 3, "a3.raw")
    res = repo.run("snapshots", "--json")
    assert res.code in (0, 6) and "Traceback" not in res.stderr, res.describe()
    assert repo.v["a3_8"] in res.stderr + res.stdout
    res = repo.run("check")
    fails(res, 6)
    assert repo.v["a3_8"] in res.stdout, res.describe()
    res = repo.run("forget", "vm1", "--keep-last", "1")
    assert res.code in (0, 6), res.describe()
    assert repo.snapshot_path("a3").exists(), "forget removed a snapshot whose protection " \
        "it could not read"


# ---------------------------------------------------------------- the cache
def _cache_db(repo: Repo) -> Path:
    (db,) = (repo.tmp / "cache").glob("*/cache.sqlite")
    return db


@pytest.mark.parametrize("how", ["truncate", "garbage", "delete", "flip"])
def test_damaged_cache_is_rebuilt(repo: Repo, how: str) -> None:
    repo.ok("snapshots")
    db = _cache_db(repo)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    if how == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        DAMAGES[how](db, None)
    assert len(json.loads(repo.ok("snapshots", "--json").stdout)) == 8
    repo.restores(f"vm1@{repo.v['a2']}", 2, "a2.raw")
    repo.ok("check")


def test_poisoned_cache_manifest_never_restores_the_wrong_data(repo: Repo) -> None:
    """The cache holds decoded manifests; one swapped for another snapshot's must not make
    `vm1@a2` restore othervm's disk."""
    repo.ok("snapshots")
    db = sqlite3.connect(_cache_db(repo))
    with db:
        (data,) = db.execute("SELECT data FROM snaps WHERE id=?", (repo.v["o1"],)).fetchone()
        db.execute("UPDATE snaps SET data=? WHERE id=?", (data, repo.v["a2"]))
    db.close()
    out = repo.tmp / "a2.raw"
    res = repo.run("image", "restore", f"vm1@{repo.v['a2']}", str(out))
    if res.code == 0:
        assert out.read_bytes() == image_bytes(2), "restored another snapshot's data"
    else:
        fails(res, 6)
    res = repo.run("snapshots", "--json")
    if res.code == 0:
        names = {s["id"]: s["name"] for s in json.loads(res.stdout)}
        assert names[repo.v["a2"]] == "vm1"


def test_cache_of_another_repository_is_not_trusted(repo: Repo, world: World) -> None:
    """A cache directory copied from another repository with the same ID (a restored
    backup of the cache, a cloned repository) must not make missing chunks look present."""
    repo.ok("snapshots")
    oid = chunk_ids_of(repo.env, f"othervm@{repo.v['o1']}")[0]
    chunk_path(repo.path, oid).unlink()
    res = repo.run("check")
    fails(res, 6)
    assert oid[:16] in res.stdout


def test_rolled_back_repository_under_a_warm_cache(repo: Repo, world: World) -> None:
    """E.g. the repository disk restored from last week's copy: the cache remembers
    chunks the repository no longer has; a backup must not reference them unchecked."""
    old = repo.tmp / "old-copy"
    shutil.copytree(repo.path, old)
    img = str(world.root / "img.raw")
    repo.ok("image", "backup", img, "--name", "newvm")
    shutil.rmtree(repo.path)
    shutil.copytree(old, repo.path)
    repo.ok("image", "backup", img, "--name", "newvm", "--force-read")
    res = repo.run("check")
    assert res.code == 0, res.describe()
