"""Remembered chunk ID translations for re-encrypting copies (advisory, local).

When source and destination have different keys, a chunk's destination ID is known only
after decrypting it. This table (SQLite in the cache directory of the destination)
remembers ``source ID → destination ID`` so that a resumed or repeated copy does not
download chunks again just to learn that the destination has them. A translation never
goes stale: both IDs are fixed functions of the plaintext and the two master keys, which
never change. Losing the file costs downloads, never correctness.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

from vmdr.repository.cache import cache_root

log = logging.getLogger(__name__)


class ChunkMap:
    def __init__(self, src_id: str, dst_id: str, root: str | None = None) -> None:
        d = os.path.join(root or cache_root(), dst_id)
        os.makedirs(d, mode=0o700, exist_ok=True)
        self.path = os.path.join(d, f"copymap-{src_id}.sqlite")
        self._lock = threading.Lock()
        self._pending: dict[bytes, bytes] = {}
        self._db: sqlite3.Connection | None = None
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            log.warning("copy map %s is unusable (%s); rebuilding it", self.path, exc)
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.path + suffix)
                except FileNotFoundError:
                    pass
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS map (src BLOB PRIMARY KEY, dst BLOB) WITHOUT ROWID")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("SELECT count(*) FROM map").fetchone()
        return db

    def get(self, src: bytes) -> bytes | None:
        with self._lock:
            hit = self._pending.get(src)
            if hit is not None or self._db is None:
                return hit
            row = self._db.execute("SELECT dst FROM map WHERE src=?", (src,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, src: bytes, dst: bytes) -> None:
        with self._lock:
            self._pending[src] = dst
            if len(self._pending) >= 256:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending and self._db is not None:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO map VALUES (?,?)",
                                     self._pending.items())
        self._pending.clear()

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_locked()
                if self._db is not None:
                    self._db.close()
            except sqlite3.Error as exc:
                log.warning("could not save copy map: %s", exc)
            self._db = None
