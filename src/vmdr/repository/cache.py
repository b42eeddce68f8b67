"""The local, advisory per-repository cache (SQLite in the user's cache directory).

It remembers which chunk IDs the repository holds, so a backup to S3 or SFTP does not
ask the server about every chunk, and the decoded manifests of snapshots. It is never
the source of truth: its chunk list is dropped when the repository's prune generation
changes or a snapshot it knew has vanished (a forget, or a repository rolled back to an
older copy of itself), a manifest is used only if it hashes to its ID, and the whole
database is rebuilt when it is missing or corrupt.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterable

import platformdirs

log = logging.getLogger(__name__)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snaps (id TEXT PRIMARY KEY, data BLOB);
"""


def _private(path: str) -> None:
    """Create the database file 0600 before SQLite does (its WAL and shared-memory files
    take the database's mode); tighten files an older vmdr left readable. The cache holds
    decoded manifests, domain XML included."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        try:
            if os.stat(path + suffix).st_mode & 0o077:
                os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def cache_root() -> str:
    return os.environ.get("VMDR_CACHE_DIR") or platformdirs.user_cache_dir("vmdr")


class Cache:
    def __init__(self, repo_id: str, root: str | None = None) -> None:
        self.dir = os.path.join(root or cache_root(), repo_id)
        self.path = os.path.join(self.dir, "cache.sqlite")
        self._lock = threading.Lock()
        self._pending: set[bytes] = set()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for attempt in (1, 2):
            try:
                _private(self.path)
                db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                db.executescript(_SCHEMA)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("SELECT count(*) FROM meta").fetchone()
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    db.close()
                    raise sqlite3.DatabaseError("quick_check failed")
                return db
            except sqlite3.DatabaseError as exc:
                if attempt == 2:
                    raise
                log.warning("cache %s is corrupt (%s); rebuilding it", self.path, exc)
                for suffix in ("", "-wal", "-shm"):
                    try:
                        os.unlink(self.path + suffix)
                    except FileNotFoundError:
                        pass
        raise AssertionError("unreachable")

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def sync_generation(self, generation: str) -> None:
        """Drop the chunk list if the repository was pruned since it was made."""
        if self.get_meta("generation") != generation:
            with self._lock, self._db:
                self._db.execute("DELETE FROM chunks")
                self._db.execute("DELETE FROM meta WHERE k='chunks_complete'")
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)",
                                 (generation,))
            self._pending.clear()

    @property
    def chunks_complete(self) -> bool:
        return self.get_meta("chunks_complete") == "1"

    def fill_chunks(self, ids: Iterable[bytes]) -> None:
        """Replace the chunk list with a full listing of the repository."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM chunks")
            self._db.executemany("INSERT OR IGNORE INTO chunks VALUES (?)", ((i,) for i in ids))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('chunks_complete', '1')")

    def has_chunk(self, oid: bytes) -> bool:
        with self._lock:
            if oid in self._pending:
                return True
            row = self._db.execute("SELECT 1 FROM chunks WHERE id=?", (oid,)).fetchone()
            return row is not None

    def add_chunk(self, oid: bytes) -> None:
        with self._lock:
            self._pending.add(oid)
            if len(self._pending) >= 1024:
                self._flush_locked()

    def discard_chunks(self, ids: Iterable[bytes]) -> None:
        with self._lock, self._db:
            self._flush_locked()
            self._db.executemany("DELETE FROM chunks WHERE id=?", ((i,) for i in ids))

    def _flush_locked(self) -> None:
        if self._pending:
            with self._db:
                self._db.executemany("INSERT OR IGNORE INTO chunks VALUES (?)",
                                     ((i,) for i in self._pending))
            self._pending.clear()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def get_snapshot(self, sid: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM snaps WHERE id=?", (sid,)).fetchone()
        return None if row is None else bytes(row[0])

    def put_snapshot(self, sid: str, data: bytes) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO snaps VALUES (?,?)", (sid, data))

    def snapshot_ids(self) -> set[str]:
        with self._lock:
            return {str(r[0]) for r in self._db.execute("SELECT id FROM snaps")}

    def forget_snapshots(self, keep: set[str]) -> None:
        with self._lock, self._db:
            rows = [r[0] for r in self._db.execute("SELECT id FROM snaps")]
            self._db.executemany("DELETE FROM snaps WHERE id=?",
                                 ((r,) for r in rows if r not in keep))

    def close(self) -> None:
        try:
            self.flush()
            self._db.close()
        except sqlite3.Error as exc:
            log.warning("could not save cache: %s", exc)
