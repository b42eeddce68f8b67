"""Pool, media-set, retention, rotation and catalog decisions with no device at all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vmdr.errors import MediaRefused, UsageError
from vmdr.tape.catalog import Catalog, CatalogStore, SnapshotEntry
from vmdr.tape.media import (
    Media,
    MediaSet,
    Pool,
    Rotation,
    calendar_start,
    check_allocation,
    check_overwrite,
    choose_free_media,
    needs_new_set,
    overwrite_refusal,
    parse_retention,
)

NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)  # a Thursday


def _set(created: datetime, last: datetime | None = None, pool: str = "p") -> MediaSet:
    return MediaSet("s-" + created.isoformat(), pool, created, "repo", [], last or created)


def test_retention_and_allocation_parsing() -> None:
    assert parse_retention("keep") is None
    assert parse_retention("overwrite") == 0
    assert parse_retention("30d") == 30 * 86400
    assert parse_retention("2w") == 14 * 86400
    with pytest.raises(UsageError):
        parse_retention("soon")
    assert check_allocation("mon,thu") == "mon,thu"
    with pytest.raises(UsageError):
        check_allocation("fortnightly")


def test_allocation_policies() -> None:
    cur = _set(NOW - timedelta(hours=2))
    assert needs_new_set(Pool("p", "continue"), None, NOW)
    assert not needs_new_set(Pool("p", "continue"), cur, NOW)
    assert needs_new_set(Pool("p", "always"), cur, NOW)
    assert not needs_new_set(Pool("p", "daily"), cur, NOW)
    assert needs_new_set(Pool("p", "daily"), _set(NOW - timedelta(days=1)), NOW)
    # weekly: Monday 00:00 is the boundary
    assert calendar_start("weekly", NOW) == datetime(2026, 11, 30, tzinfo=UTC)
    assert calendar_start("monthly", NOW) == datetime(2026, 12, 1, tzinfo=UTC)
    # mon,thu: Thursday 00:00 today
    assert calendar_start("mon,thu", NOW) == datetime(2026, 12, 3, tzinfo=UTC)
    assert calendar_start("sat", NOW) == datetime(2026, 11, 28, tzinfo=UTC)
    assert needs_new_set(Pool("p", "mon,thu"), _set(datetime(2026, 12, 2, tzinfo=UTC)), NOW)
    closed = _set(NOW)
    closed.closed = True
    assert needs_new_set(Pool("p", "continue"), closed, NOW)


def test_overwrite_only_after_retention_and_never_worm_or_vaulted() -> None:
    pool = Pool("p", "always", "7d")
    ms = _set(NOW - timedelta(days=10), NOW - timedelta(days=6))
    m = Media("u1", "T1", "p", NOW - timedelta(days=30), ms.uuid)
    sets = {ms.uuid: ms}
    assert "retained until" in (overwrite_refusal(m, pool, sets, NOW) or "")
    with pytest.raises(MediaRefused):
        check_overwrite(m, pool, sets, NOW)
    assert overwrite_refusal(m, pool, sets, NOW + timedelta(days=2)) is None
    assert "WORM" in (overwrite_refusal(m, Pool("p", worm=True, retention="1d"), sets,
                                        NOW + timedelta(days=30)) or "")
    assert "forever" in (overwrite_refusal(m, Pool("p", retention="keep"), sets,
                                           NOW + timedelta(days=3650)) or "")
    m.location = "vault:spandau"
    assert "vault" in (overwrite_refusal(m, pool, sets, NOW + timedelta(days=30)) or "")
    other = Media("u2", "T2", "q", NOW)
    assert "belongs to pool" in (overwrite_refusal(other, pool, sets, NOW) or "")


def test_choose_free_media_prefers_blank_then_oldest_expired() -> None:
    pool = Pool("p", "always", "1d")
    old = _set(NOW - timedelta(days=20))
    newer = _set(NOW - timedelta(days=5))
    a = Media("a", "A", "p", NOW - timedelta(days=40), old.uuid)
    b = Media("b", "B", "p", NOW - timedelta(days=40), newer.uuid)
    c = Media("c", "C", "p", NOW - timedelta(days=1))
    sets = {old.uuid: old, newer.uuid: newer}
    assert choose_free_media(pool, [a, b, c], sets, NOW) is c
    assert choose_free_media(pool, [a, b, c], sets, NOW, exclude={"c"}) is a
    assert choose_free_media(pool, [a, b, c], sets, NOW, present={"B"}) is b
    assert choose_free_media(pool, [a, b], sets, NOW - timedelta(days=19, hours=12)) is None


def test_seed_rotation_wraps_and_keeps_history(tmp_path: Path) -> None:
    rot = Rotation(0, 3)
    seen = []
    for i in range(7):
        s = rot.next_slot()
        rot.used(s, f"T{s}", NOW + timedelta(days=i))
        seen.append(s)
    assert seen == [1, 2, 3, 1, 2, 3, 1]
    assert rot.last_use(2) == NOW + timedelta(days=4)
    store = CatalogStore(tmp_path)
    store.save_rotation("p", rot)
    assert (tmp_path / "rotation/p/slot").read_text() == "1\n"
    back = store.rotation("p")
    assert back.history == rot.history and back.maxslot == 3
    with pytest.raises(UsageError):
        store.rotation("other")
    with pytest.raises(UsageError):
        Rotation.parse("x", "3", "")


def test_catalog_roundtrip_and_chunk_locations(tmp_path: Path) -> None:
    from vmdr.tape.media import TapeFile

    cat = Catalog()
    cat.pools["p"] = Pool("p", vault="v")
    ms = _set(NOW)
    cat.sets[ms.uuid] = ms
    m = Media("u", "T1", "p", NOW, ms.uuid, 0, [TapeFile(2, "chunks", ["aa", "bb"], 10)])
    ms.media.append("u")
    cat.media["u"] = m
    cat.snapshots["s"] = SnapshotEntry("s", "web", "t", ms.uuid, "u", 3, 5)
    store = CatalogStore(tmp_path)
    store.save(cat)
    back = store.load()
    assert back.to_doc() == cat.to_doc()
    assert back.chunk_locations(ms.uuid) == {"aa": ("u", 2), "bb": ("u", 2)}
    back.forget_set_of(back.media["u"])
    assert not back.snapshots and back.media["u"].media_set is None
    (tmp_path / "catalog.json").write_text("{broken")
    with pytest.raises(UsageError, match="rebuild"):
        store.load()
