"""The tape catalog on disk: which tapes exist, in which pool and set, where they are, and
which chunks and snapshots each tape file holds.

Two stores hold the same JSON document (``CatalogBackend``):

- ``CatalogStore``: one file in the tape directory (``VMDR_TAPE_DIR``, default
  ``/var/lib/vmdr/tape``), replaced atomically under an ``flock``; the rotation state as
  the seed's three small files beside it;
- ``vmdr.tape.catalog_db.DbCatalogStore``: the agent's database (its SQLite file, or
  PostgreSQL for a fleet), table ``tape_catalog``.

``open_catalog(spec)`` takes a directory or a database URL. The catalog is a cache of the
tapes: every tape also ends with its own catalog, and ``vmdr tape catalog --rebuild``
recreates it from the tapes alone.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vmdr.errors import SlotEmpty, UnsupportedFormat, UsageError
from vmdr.tape.media import Media, MediaSet, Pool, Rotation
from vmdr.timeutil import format_time, parse_time

FORMAT = "vmdr-tape-catalog"
VERSION = 1
DEFAULT_DIR = "/var/lib/vmdr/tape"


@dataclass
class SnapshotEntry:
    id: str
    name: str
    time: str
    media_set: str
    tape: str  # uuid
    file: int
    size: int = 0

    def to_doc(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VaultEvent:
    time: datetime
    tape: str  # label
    to: str  # "vault:NAME" | "library" | "offline"

    def to_doc(self) -> dict[str, Any]:
        return {"time": format_time(self.time), "tape": self.tape, "to": self.to}


@dataclass
class Catalog:
    pools: dict[str, Pool] = field(default_factory=dict)
    media: dict[str, Media] = field(default_factory=dict)
    sets: dict[str, MediaSet] = field(default_factory=dict)
    snapshots: dict[str, SnapshotEntry] = field(default_factory=dict)
    history: list[VaultEvent] = field(default_factory=list)

    # ---------------------------------------------------------------- queries
    def pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise UsageError(f"no tape pool {name!r} (create it with 'vmdr tape pool add')") \
                from None

    def by_label(self, label: str) -> Media | None:
        return next((m for m in self.media.values() if m.label == label), None)

    def need_label(self, label: str) -> Media:
        m = self.by_label(label)
        if m is None:
            raise SlotEmpty(f"no tape {label!r} in the catalog")
        return m

    def current_set(self, pool: str) -> MediaSet | None:
        sets = [s for s in self.sets.values() if s.pool == pool]
        return max(sets, key=lambda s: s.created) if sets else None

    def set_media(self, set_uuid: str) -> list[Media]:
        ms = self.sets[set_uuid]
        return [self.media[u] for u in ms.media if u in self.media]

    def chunk_locations(self, set_uuid: str | None = None) -> dict[str, tuple[str, int]]:
        """chunk id (hex) → (tape uuid, file number), over one set or all."""
        out: dict[str, tuple[str, int]] = {}
        for m in self.media.values():
            if set_uuid is not None and m.media_set != set_uuid:
                continue
            for f in m.files:
                if f.kind == "chunks":
                    for cid in f.ids:
                        out.setdefault(cid, (m.uuid, f.number))
        return out

    def forget_set_of(self, media: Media) -> None:
        """*media* is being overwritten: what its old set had on it is gone."""
        old = media.media_set
        media.files, media.media_set, media.full, media.seq = [], None, False, 0
        media.last_written = None
        if old and old in self.sets:
            self.snapshots = {k: v for k, v in self.snapshots.items() if v.tape != media.uuid}

    # ---------------------------------------------------------------- (de)serialise
    def to_doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION,
                "pools": {k: p.to_doc() for k, p in sorted(self.pools.items())},
                "media": {k: m.to_doc() for k, m in sorted(self.media.items())},
                "sets": {k: s.to_doc() for k, s in sorted(self.sets.items())},
                "snapshots": {k: s.to_doc() for k, s in sorted(self.snapshots.items())},
                "history": [e.to_doc() for e in self.history]}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Catalog:
        if d.get("format") != FORMAT:
            raise UsageError("not a vmdr tape catalog")
        if d.get("version") != VERSION:
            raise UnsupportedFormat(f"tape catalog version {d.get('version')} is not "
                                    f"supported (this vmdr reads {VERSION})")
        return cls({k: Pool.from_doc(v) for k, v in d.get("pools", {}).items()},
                   {k: Media.from_doc(v) for k, v in d.get("media", {}).items()},
                   {k: MediaSet.from_doc(v) for k, v in d.get("sets", {}).items()},
                   {k: SnapshotEntry(**v) for k, v in d.get("snapshots", {}).items()},
                   [VaultEvent(parse_time(e["time"]), e["tape"], e["to"])
                    for e in d.get("history", [])])


class CatalogBackend(abc.ABC):
    """Where the catalog document and the rotation state live."""

    where: str  # for messages

    @abc.abstractmethod
    def _read(self) -> str | None:
        """The catalog document, or None when there is none yet."""

    @abc.abstractmethod
    def _write(self, text: str) -> None:
        """Replace the catalog document atomically."""

    @abc.abstractmethod
    def _lock(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock across processes (and hosts, for a shared database)."""

    @abc.abstractmethod
    def _read_rotation(self, pool: str) -> tuple[str, str, str] | None:
        """The rotation's (slot, maxslot, history) texts, or None."""

    @abc.abstractmethod
    def _write_rotation(self, pool: str, slot: str, maxslot: str, history: str) -> None:
        """Store the rotation's three texts."""

    def load(self) -> Catalog:
        text = self._read()
        if text is None:
            return Catalog()
        try:
            return Catalog.from_doc(json.loads(text))
        except ValueError:
            raise UsageError(f"{self.where} is corrupt: rebuild it with "
                             "'vmdr tape catalog --rebuild'") from None

    def save(self, cat: Catalog) -> None:
        self._write(json.dumps(cat.to_doc(), indent=1))

    @contextlib.contextmanager
    def locked(self) -> Iterator[Catalog]:
        """Load under an exclusive lock; save when the block ends. Holds the lock for the
        whole job, so a restore never takes a tape a backup is using."""
        with self._lock():
            cat = self.load()
            try:
                yield cat
            finally:
                # also on failure: what was written to tape before the error is real
                self.save(cat)

    def rotation(self, pool: str, maxslot: int | None = None) -> Rotation:
        got = self._read_rotation(pool)
        if got is None:
            if maxslot is None:
                raise UsageError(f"pool {pool} has no rotation state: give --maxslot")
            return Rotation(0, maxslot)
        return Rotation.parse(*got)

    def save_rotation(self, pool: str, rot: Rotation) -> None:
        self._write_rotation(pool, f"{rot.slot}\n", f"{rot.maxslot}\n", rot.history_text())


class CatalogStore(CatalogBackend):
    """The catalog file and the rotation files in one directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.path = self.root / "catalog.json"
        self.where = str(self.path)

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _write(self, text: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "catalog.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    # the seed's files: slot, maxslot, history
    def _read_rotation(self, pool: str) -> tuple[str, str, str] | None:
        d = self.root / "rotation" / pool
        try:
            return ((d / "slot").read_text(), (d / "maxslot").read_text(),
                    (d / "history").read_text())
        except FileNotFoundError:
            return None

    def _write_rotation(self, pool: str, slot: str, maxslot: str, history: str) -> None:
        d = self.root / "rotation" / pool
        d.mkdir(parents=True, exist_ok=True)
        (d / "slot").write_text(slot)
        (d / "maxslot").write_text(maxslot)
        (d / "history").write_text(history)


def is_database_url(spec: str) -> bool:
    return spec.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:"))


def open_catalog(spec: str) -> CatalogBackend:
    """A directory (the local file store) or a database URL (the agent's database)."""
    if is_database_url(spec):
        from vmdr.tape.catalog_db import DbCatalogStore

        return DbCatalogStore(spec)
    if "://" in spec:
        raise UsageError(f"the tape catalog is a directory, sqlite:///FILE or postgresql://…, "
                         f"not {spec.split('://', 1)[0]}://")
    return CatalogStore(spec)
