"""Sets and maps of chunk IDs kept on disk, for jobs that walk millions of chunks.

A Python ``set`` of 32-byte IDs costs about 100 bytes a member, so ``check``, ``prune``
and ``copy`` on a repository with a million chunks would need 100+ MB for each set they
keep. :class:`IdTable` is a private temporary SQLite file instead (removed on
:meth:`~IdTable.close`), with a bounded page cache: memory stays flat, time grows with
the number of IDs times a B-tree step. Writes are buffered and go in as one transaction
per batch; every read sees the buffered writes. One thread only (the caller's).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator

CACHE_KIB = 8 * 1024  # SQLite page cache per table file: the memory bound
_BATCH = 4096


class IdTable:
    """An on-disk map from ID to an optional value (an ID, or an integer), or a set."""

    def __init__(self, prefix: str = "vmdr-ids-") -> None:
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".sqlite")
        os.close(fd)  # 0600, like every mkstemp file
        self._db = sqlite3.connect(self.path)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE",
                       f"cache_size=-{CACHE_KIB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE ids (id BLOB PRIMARY KEY, v) WITHOUT ROWID")
        self._pending: dict[bytes, object] = {}

    # ------------------------------------------------------------------ writing
    def add(self, oid: bytes, value: object = None) -> None:
        """Add *oid* (or replace its value)."""
        self._pending[oid] = value
        if len(self._pending) >= _BATCH:
            self.flush()

    def add_many(self, ids: Iterable[bytes]) -> None:
        """Add every ID of *ids* (a value already stored for one is kept)."""
        self.flush()
        with self._db:
            self._db.executemany("INSERT OR IGNORE INTO ids (id) VALUES (?)",
                                 ((i,) for i in ids))

    def flush(self) -> None:
        if self._pending:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?)",
                                     self._pending.items())
            self._pending.clear()

    # ------------------------------------------------------------------ reading
    def __contains__(self, oid: object) -> bool:
        if oid in self._pending:
            return True
        return self._db.execute("SELECT 1 FROM ids WHERE id=?", (oid,)).fetchone() is not None

    def get(self, oid: bytes) -> object:
        """The value stored with *oid*; KeyError if it is not a member."""
        if oid in self._pending:
            return self._pending[oid]
        row = self._db.execute("SELECT v FROM ids WHERE id=?", (oid,)).fetchone()
        if row is None:
            raise KeyError(oid)
        return row[0]

    def __len__(self) -> int:
        self.flush()
        return int(self._db.execute("SELECT count(*) FROM ids").fetchone()[0])

    def __iter__(self) -> Iterator[bytes]:
        """The IDs in ascending order (a snapshot of the table: do not add while iterating)."""
        self.flush()
        for (oid,) in self._db.execute("SELECT id FROM ids ORDER BY id"):
            yield bytes(oid)

    def total(self) -> int:
        """The sum of the integer values."""
        self.flush()
        return int(self._db.execute("SELECT coalesce(sum(v), 0) FROM ids").fetchone()[0])

    def missing_from(self, other: IdTable) -> list[bytes]:
        """The IDs of this table that *other* lacks, in ascending order (a list: these
        are the problems a caller reports, not the bulk)."""
        self.flush()
        other.flush()
        self._db.execute("ATTACH DATABASE ? AS other", (other.path,))
        try:
            return [bytes(r[0]) for r in self._db.execute(
                "SELECT id FROM ids WHERE id NOT IN (SELECT id FROM other.ids) ORDER BY id")]
        finally:
            self._db.execute("DETACH DATABASE other")

    def close(self) -> None:
        self._db.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> IdTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
