"""The tape catalog in the agent's database: SQLite (the agent's state file, one host) or
PostgreSQL (a fleet). The same JSON documents as the file store, one row each::

    tape_catalog(key, doc, updated)
        "catalog"            the catalog document (docs/format.md §tape catalog)
        "rotation:POOL"      {"slot": …, "maxslot": …, "history": …} (the seed's three files)

The job-long exclusive lock is not a transaction (a tape job runs for hours): PostgreSQL
takes a session advisory lock on a connection of its own; SQLite ``flock``s a file beside
the database (``DB.tape-lock``), as the file store does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import zlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from vmdr.errors import UsageError
from vmdr.tape.catalog import CatalogBackend
from vmdr.timeutil import utcnow

meta = sa.MetaData()
docs_t = sa.Table(
    "tape_catalog", meta,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("doc", sa.Text, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)
_LOCK_ID = zlib.crc32(b"vmdr tape catalog")  # the advisory lock's key (PostgreSQL)


def engine_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


class DbCatalogStore(CatalogBackend):
    def __init__(self, url: str | Engine) -> None:
        if isinstance(url, Engine):
            self.engine = url
        else:
            args = {"timeout": 30} if url.startswith("sqlite:") else {}
            try:
                self.engine = sa.create_engine(engine_url(url), future=True,
                                               pool_pre_ping=True, connect_args=args)
            except (sa.exc.ArgumentError, ImportError) as exc:
                raise UsageError(f"bad tape catalog database URL: {exc}") from None
        self.where = f"the tape catalog in {self.engine.url.render_as_string()}"
        try:
            meta.create_all(self.engine)
        except sa.exc.OperationalError as exc:
            first = str(exc.orig).strip().splitlines()[0]
            raise UsageError(f"cannot open the tape catalog database: {first}") from None

    @property
    def dialect(self) -> str:
        return str(self.engine.dialect.name)

    def _get(self, key: str) -> str | None:
        with self.engine.connect() as c:
            doc = c.execute(sa.select(docs_t.c.doc).where(docs_t.c.key == key)).scalar()
        return None if doc is None else str(doc)

    def _put(self, key: str, doc: str) -> None:
        with self.engine.begin() as c:
            c.execute(sa.delete(docs_t).where(docs_t.c.key == key))
            c.execute(sa.insert(docs_t).values(key=key, doc=doc, updated=utcnow().timestamp()))

    def _read(self) -> str | None:
        return self._get("catalog")

    def _write(self, text: str) -> None:
        self._put("catalog", text)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self.dialect == "postgresql":
            with self.engine.connect() as c:
                c.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_ID})
                try:
                    yield
                finally:
                    c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_ID})
                    c.commit()
            return
        db = self.engine.url.database
        if not db or db == ":memory:":
            yield
            return
        with open(f"{os.path.abspath(db)}.tape-lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _read_rotation(self, pool: str) -> tuple[str, str, str] | None:
        doc = self._get(f"rotation:{pool}")
        if doc is None:
            return None
        d = json.loads(doc)
        return str(d["slot"]), str(d["maxslot"]), str(d["history"])

    def _write_rotation(self, pool: str, slot: str, maxslot: str, history: str) -> None:
        self._put(f"rotation:{pool}", json.dumps({"slot": slot, "maxslot": maxslot,
                                                  "history": history}))
