"""Disk full under the SQLite state (a real 2 MiB tmpfs): the agent raises one clear alert,
keeps running, resolves when space is back, and the database stays intact."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_agent_runner import make_agent


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "state"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_alerts_once_and_the_database_survives(tmp_path: Path,
                                                         small_fs: Path) -> None:
    a = make_agent(tmp_path, ["vm1"], extra="")
    a.history.close()
    a.cfg.agent.state = str(small_fs / "agent.db")
    from vmdr.agent.alerts import Alerter
    from vmdr.agent.history import History

    a.history = History.open(a.cfg.agent.state)
    a.coord.history = a.history  # type: ignore[attr-defined]
    a.runner.history = a.history
    a.alerter = Alerter(a.cfg.agent.alerts, a.history)
    for i in range(20):
        a.history.add_log("x", f"line {i}", 1.0)
    junk = small_fs / "junk"
    with open(junk, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass

    async def run_for(seconds: float) -> None:
        a.stopping = asyncio.Event()
        t = asyncio.create_task(a.run(period=0.2))
        await asyncio.sleep(seconds)
        a.stopping.set()
        await t

    asyncio.run(run_for(2.0))
    sent = [s for s in a.alerter.sent if s.get("kind") == "state_disk"]
    assert [s["status"] for s in sent] == ["firing"], a.alerter.sent
    assert "cannot write its history" in sent[0]["message"]
    junk.unlink()
    asyncio.run(run_for(1.5))
    sent = [s for s in a.alerter.sent if s.get("kind") == "state_disk"]
    assert [s["status"] for s in sent] == ["firing", "resolved"]
    a.history.close()
    db = sqlite3.connect(a.cfg.agent.state)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM logs").fetchone() == (20,)
    db.close()
