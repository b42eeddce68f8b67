"""The tape catalog in the agent's database (SQLite here; PostgreSQL in
tests/integration/test_tape_catalog_pg.py): the same documents as the file store, a
job-long lock, the rotation state, and the CLI choosing the agent's database when there
is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from vmdr.tape.catalog import CatalogBackend, CatalogStore, open_catalog
from vmdr.tape.catalog_db import DbCatalogStore
from vmdr.tape.media import Media, Pool, Rotation

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def exercise_store(store: CatalogBackend) -> None:
    """What every catalog store must do (also run on PostgreSQL)."""
    assert store.load().pools == {}
    with store.locked() as cat:
        cat.pools["weekly"] = Pool("weekly", "always", "8w", vault="bunker")
        cat.media["u1"] = Media("u1", "VMD001L8", "weekly", T0, location="vault:bunker")
    again = store.load()
    assert again.pools["weekly"].vault == "bunker"
    assert again.media["u1"].label == "VMD001L8" and again.media["u1"].in_vault == "bunker"
    # the lock is held for the whole block: a second job waits for it
    order: list[str] = []
    inside = threading.Event()

    def second() -> None:
        inside.wait(5)
        with store.locked() as cat:
            order.append("second")
            assert "u2" in cat.media  # it sees what the first job saved
    t = threading.Thread(target=second)
    t.start()
    with store.locked() as cat:
        inside.set()
        time.sleep(0.3)
        cat.media["u2"] = Media("u2", "VMD002L8", "weekly", T0)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    # the seed's rotation state
    rot = Rotation(0, 4)
    rot.used(rot.next_slot(), "VMD001L8", T0)
    store.save_rotation("weekly", rot)
    back = store.rotation("weekly")
    assert (back.slot, back.maxslot, back.history) == (1, 4, [(T0, 1, "VMD001L8")])


def test_sqlite_store(tmp_path: Path) -> None:
    store = open_catalog(f"sqlite:///{tmp_path / 'agent.db'}")
    assert isinstance(store, DbCatalogStore) and store.dialect == "sqlite"
    exercise_store(store)
    assert (tmp_path / "agent.db.tape-lock").exists()


def test_file_store(tmp_path: Path) -> None:
    store = open_catalog(str(tmp_path / "tape"))
    assert isinstance(store, CatalogStore)
    exercise_store(store)
    assert (tmp_path / "tape" / "rotation" / "weekly" / "history").exists()


def _vmdr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmdr.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_uses_the_agents_database_when_there_is_one(tmp_path: Path) -> None:
    state = tmp_path / "agent.db"
    conf = tmp_path / "vmdr.toml"
    conf.write_text(f'[agent]\nstate = "{state}"\n')
    env = {k: v for k, v in os.environ.items() if k != "VMDR_TAPE_DIR"}
    env["VMDR_CONFIG"] = str(conf)
    # no agent database yet: the pool goes to the local directory given
    p = _vmdr({**env, "VMDR_TAPE_DIR": str(tmp_path / "tape")}, "tape", "pool", "add", "local")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "tape" / "catalog.json").exists()
    # the agent's state database exists: the catalog lives there
    DbCatalogStore(f"sqlite:///{state}")
    p = _vmdr(env, "tape", "pool", "add", "offsite", "--vault", "bunker")
    assert p.returncode == 0, p.stderr
    assert DbCatalogStore(f"sqlite:///{state}").load().pools["offsite"].vault == "bunker"
    p = _vmdr(env, "--json", "tape", "pool", "list")
    assert [x["name"] for x in json.loads(p.stdout)] == ["offsite"]
    # an explicit URL wins; a bad one is a one-line error
    p = _vmdr(env, "tape", "pool", "list", "--tape-dir", "postgresql://nobody@127.0.0.1:1/x")
    assert p.returncode != 0 and p.stderr.startswith("vmdr: error:"), p.stderr
    assert "Traceback" not in p.stderr


def test_plan_reads_a_database_catalog(tmp_path: Path) -> None:
    from vmdr.jobs.tape_plan import catalog_of

    db = f"sqlite:///{tmp_path / 'agent.db'}"
    with DbCatalogStore(db).locked() as cat:
        cat.pools["daily"] = Pool("daily")
    got, pool = catalog_of(f"tape:{db}?pool=daily")
    assert "daily" in got.pools and pool == "daily"
