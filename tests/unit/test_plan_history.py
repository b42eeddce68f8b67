"""Restore and verification records as the plan reads them: measured restore rates and
boot times, records copied from another repository, and the cache round trip."""

from __future__ import annotations

import statistics
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.repofixtures import FakeClock, reopen
from tests.unit.test_plan_estates import GIB, NOW, build_estate, evaluate
from vmdr import config
from vmdr.plan import history
from vmdr.timeutil import format_time

REPO_ID = "a" * 32
OTHER_ID = "b" * 32


def record(**kw: Any) -> dict[str, Any]:
    """What ``vmdr restore`` attaches (see ``jobs.vmrestore.restore_vm``): 40 GiB of disks,
    3 GiB of data, in 80 s; a heartbeat 18 s after the start."""
    return {"kind": "restore", "bytes_written": 3 * GIB, "size": 40 * GIB, "restore_s": 80.0,
            "heartbeat_s": 18.0, "target": "qemu:///system", "format": "qcow2",
            "repository": REPO_ID, **kw}


def restore_doc(**kw: Any) -> dict[str, Any]:
    """The record as the repository returns it (with its time)."""
    return {"time": format_time(NOW), **record(**kw)}


def test_records_from_attachments() -> None:
    vers, rests = history.from_attachments([
        {"kind": "protect", "time": format_time(NOW), "protected": True},
        {"kind": "verification", "time": format_time(NOW), "status": "passed",
         "heartbeat_s": 9.0},
        restore_doc(),
        restore_doc(heartbeat_s=None, restore_s=0),
        restore_doc(repository=OTHER_ID),  # brought here by `vmdr copy`
    ], REPO_ID)
    assert [v.heartbeat_s for v in vers] == [9.0]
    assert [(r.same_repo, r.throughput) for r in rests] == [
        (True, 40 * GIB / 80), (True, None), (False, None)]
    assert rests[0] == history.Restore(NOW, 40 * GIB, 3 * GIB, 80.0, 18.0, "qemu:///system",
                                       "qcow2")
    # without a size (not written by vmdr), the bytes written stand in for it
    _, (r,) = history.from_attachments([restore_doc(size=None)], REPO_ID)
    assert r.throughput == 3 * GIB / 80


def test_restore_records_survive_the_cache() -> None:
    _, rests = history.from_attachments([restore_doc(), restore_doc(repository=OTHER_ID)],
                                        REPO_ID)
    copy = history.Copy("r", "vm", "c" * 64, NOW - timedelta(hours=1), 40 * GIB,
                        disks=(("vda", 40 * GIB),), restores=rests)
    state = history.RepoState("r", True, NOW, None, [copy])
    read_at, copies = history.from_cache(history.to_cache(state))
    assert read_at == NOW and copies == [copy]
    # a cache written before restores were recorded still reads
    doc = history.to_cache(state)
    del doc["copies"][0]["restores"]
    assert history.from_cache(doc)[1][0].restores == ()


def test_restores_measure_throughput_and_boot_time(tmp_path: Path) -> None:
    cfg = build_estate("two-sites-one-city", tmp_path)
    before = evaluate(cfg)
    assert before.throughput["repo-n"][1] == "default for disk"
    repo = reopen(str(tmp_path / "repo-n"), FakeClock(NOW - timedelta(minutes=10)))
    erp = repo.list_snapshots("erp")[-1]
    repo.add_attachment(erp.id, record(repository=repo.id))
    # restored without --start: a rate, no boot time
    repo.add_attachment(erp.id, record(repository=repo.id, restore_s=160.0, heartbeat_s=None))
    # copied from another repository: its boot time counts, its rate is not this one's
    repo.add_attachment(erp.id, record(restore_s=1.0, heartbeat_s=22.0, repository=OTHER_ID))
    repo.close()
    cov = evaluate(config.load(str(cfg.path)))
    rate = statistics.median([40 * GIB / 80, 40 * GIB / 160])
    assert cov.throughput["repo-n"] == (rate, "measured (2 restores)")
    assert cov.throughput["repo-s"] == before.throughput["repo-s"]
    vc = cov.vms["erp"]
    assert vc.boot_s == 22.0  # median of the verification's 25 s and the restores' 18, 22
    lc = vc.levels["vm"]
    assert lc.chosen is not None and lc.chosen.repo == "repo-n"
    assert lc.rto_estimate_s == pytest.approx(40 * GIB / rate + 22.0)
    restores = [r for c in cov.repos["repo-n"].copies for r in c.restores]
    assert [r.target for r in restores] == ["qemu:///system"] * 3
    # a restore is not a verification: the verification policy is unchanged
    assert vc.last_verified == before.vms["erp"].last_verified
