"""The tape catalog in a fleet's PostgreSQL (a real server on loopback): the same store
contract as the file and SQLite stores (tests/unit/test_tape_catalog_db.py), with the
job-long lock as a PostgreSQL advisory lock."""

from __future__ import annotations

import pytest

from tests.unit.test_tape_catalog_db import exercise_store
from vmdr.tape.catalog import open_catalog
from vmdr.tape.catalog_db import DbCatalogStore

from .agent_services import postgres, postgres_url  # noqa: F401

pytestmark = pytest.mark.postgres


def test_postgresql_store(postgres_url: str) -> None:  # noqa: F811
    store = open_catalog(postgres_url)
    assert isinstance(store, DbCatalogStore) and store.dialect == "postgresql"
    exercise_store(store)
