"""Writing a pool's media set: picks the set and the tape, appends archives, moves to the
next tape at the end-of-medium warning, and ends every tape with its catalog.

Tape layout (file numbers)::

    0  label              (barcode/name, uuid, pool)            written by `vmdr tape label`
    1  media-set label    (set uuid, sequence, repository config and key slots)
    2… chunk / snapshot archives
    n  catalog            (this tape's files and the set's snapshots; rewritten on append)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from vmdr.errors import LabelUnreadable, MediaRefused, NoWritableMedia
from vmdr.tape.catalog import Catalog, SnapshotEntry
from vmdr.tape.formats import (
    KIND_CATALOG,
    KIND_CHUNKS,
    KIND_SET,
    KIND_SNAPSHOTS,
    T_CHUNK,
    T_SNAPSHOT,
    ArchiveWriter,
)
from vmdr.tape.library import Library
from vmdr.tape.media import (
    Media,
    MediaSet,
    Pool,
    Rotation,
    TapeFile,
    check_overwrite,
    choose_free_media,
    needs_new_set,
)
from vmdr.timeutil import format_time

log = logging.getLogger(__name__)
KIND_WORDS = {KIND_CHUNKS: "chunks", KIND_SNAPSHOTS: "snapshots"}


@dataclass
class RepoInfo:
    """What a tape carries of the repository so it can be recreated from tape alone."""

    id: str
    config: bytes  # the repository's config object, verbatim (MAC'd by the repository)
    keys: dict[str, bytes] = field(default_factory=dict)  # key slot objects, verbatim


class PoolWriter:
    def __init__(self, lib: Library, cat: Catalog, pool: Pool, repo: RepoInfo,
                 mac_key: bytes | None, now: Callable[[], datetime],
                 seal_key: bytes | None = None, archive_size: int = 1 << 30,
                 on_bytes: Callable[[int], None] | None = None,
                 rotation: Rotation | None = None) -> None:
        self.lib, self.cat, self.pool, self.repo = lib, cat, pool, repo
        self.mac_key, self.seal_key, self.now = mac_key, seal_key, now
        self.archive_size = archive_size
        self.on_bytes = on_bytes
        self.rotation = rotation  # the seed's policy: the next slot's tape, whatever it is
        self.set: MediaSet | None = None
        self.media: Media | None = None
        self._arch: ArchiveWriter | None = None
        self._arch_kind = 0
        self._present: set[str] | None = None
        self.on_set: set[str] = set()  # chunk ids (hex) already in the set
        self.tapes_used: list[str] = []
        self.bytes_written = 0

    # ---------------------------------------------------------------- set and tape
    def start(self) -> MediaSet:
        now = self.now()
        cur = self.cat.current_set(self.pool.name)
        if self.lib.changer is not None:
            self._present = {e.barcode for e in self.lib.changer.status().slots
                             if e.full and e.barcode} | {
                e.barcode for e in self.lib.changer.status().drives if e.full and e.barcode}
        if cur is None or needs_new_set(self.pool, cur, now) or cur.repo_id != self.repo.id:
            if cur is not None and not cur.closed:
                cur.closed = True
            self.set = MediaSet(str(uuid.uuid4()), self.pool.name, now, self.repo.id)
            self.cat.sets[self.set.uuid] = self.set
            self._next_tape()
        else:
            self.set = cur
            self.on_set = set(self.cat.chunk_locations(cur.uuid))
            last = self.cat.media.get(cur.media[-1]) if cur.media else None
            if last is None or last.full or last.in_vault:
                self._next_tape()
            else:
                self._load(last)
                files = last.files
                at = files[-1].number if files and files[-1].kind == "catalog" else (
                    files[-1].number + 1 if files else 2)
                last.files = [f for f in files if f.number < at]
                self.lib.drive.locate_file(at)
                self.media = last
        return self.set

    def _load(self, m: Media) -> None:
        self.lib.clean_if_needed()
        got = self.lib.load_label(m.label)
        if got.uuid != m.uuid:
            raise LabelUnreadable(f"tape {m.label} has uuid {got.uuid}, the catalog says "
                                  f"{m.uuid}: relabelled? run 'vmdr tape inventory'")
        if got.pool != self.pool.name:
            raise MediaRefused(f"tape {m.label} is from pool {got.pool!r}, not "
                               f"{self.pool.name!r}")
        if self.lib.drive.status().write_protected:
            raise MediaRefused(f"tape {m.label} is write-protected")

    def _next_tape(self) -> None:
        assert self.set is not None
        now = self.now()
        if self.rotation is not None:
            self._next_slot(self.rotation)
            return
        m = choose_free_media(self.pool, list(self.cat.media.values()), self.cat.sets, now,
                              self._present, set(self.set.media))
        if m is None:
            raise NoWritableMedia(f"pool {self.pool.name} has no tape it may write: label a "
                                  "new tape or wait for retention to free one")
        self.start_on(m)

    def _next_slot(self, rot: Rotation) -> None:
        """The seed's rotation: rewind, unload, load the next slot (wrapping after
        maxslot), wait until the drive is ready; its tape must be a labelled tape of this
        pool that retention lets us overwrite."""
        slot = rot.next_slot()
        self.lib.load_slot(slot)
        got = self.lib.read_label()
        m = self.cat.media.get(got.uuid)
        if m is None:
            raise LabelUnreadable(f"the tape in slot {slot} ({got.label}) is not in the "
                                  "catalog: run 'vmdr tape inventory --read-labels'")
        self.start_on(m)
        rot.used(slot, m.label, self.now())

    def start_on(self, m: Media) -> None:
        """Make *m* the next tape of the set: check, load, write the set label."""
        assert self.set is not None
        check_overwrite(m, self.pool, self.cat.sets, self.now())
        self._load(m)
        self.cat.forget_set_of(m)
        m.media_set, m.seq = self.set.uuid, len(self.set.media)
        m.worm = m.worm or self.pool.worm
        self.set.media.append(m.uuid)
        self.media = m
        self.tapes_used.append(m.label)
        self.lib.drive.locate_file(1)
        w = ArchiveWriter(self.lib.drive, KIND_SET, self._header(1), self.mac_key)
        w.add_doc({"repository": {"id": self.repo.id, "config": self.repo.config.decode(),
                                  "keys": {k: v.decode() for k, v in self.repo.keys.items()}},
                   "set": self.set.to_doc(), "pool": self.pool.to_doc()})
        w.finish()
        m.files = [TapeFile(1, "set")]
        self._touch()

    def _header(self, number: int) -> dict[str, object]:
        assert self.set is not None and self.media is not None
        return {"media_set": self.set.uuid, "tape": self.media.uuid, "label": self.media.label,
                "seq": self.media.seq, "pool": self.pool.name, "repo_id": self.repo.id,
                "file": number, "time": format_time(self.now())}

    def _touch(self) -> None:
        assert self.set is not None and self.media is not None
        self.media.last_written = self.set.last_written = self.now()

    # ---------------------------------------------------------------- archives
    def _open(self, kind: int) -> ArchiveWriter:
        if self._arch is not None and (self._arch_kind != kind
                                       or self._arch.bytes >= self.archive_size):
            self._close()
        if self._arch is None:
            assert self.media is not None
            number = self.lib.drive.position()
            self._arch = ArchiveWriter(self.lib.drive, kind, self._header(number), self.mac_key,
                                       self.seal_key)
            self._arch_kind = kind
        return self._arch

    def _close(self) -> None:
        a, self._arch = self._arch, None
        if a is None:
            return
        assert self.media is not None
        number = int(a.header["file"])  # type: ignore[call-overload]
        before = a.bytes
        a.finish()
        self._count(a.bytes - before)
        self.media.files.append(TapeFile(number, KIND_WORDS[self._arch_kind],
                                         [i.hex() for i in a.ids], a.bytes))
        self._touch()

    def _count(self, n: int) -> None:
        self.bytes_written += n
        if self.on_bytes and n:
            self.on_bytes(n)

    def _add(self, kind: int, ftype: int, oid: bytes, blob: bytes) -> None:
        a = self._open(kind)
        before = a.bytes
        a.add(ftype, oid, blob)
        self._count(a.bytes - before)
        if a.eom:
            self._tape_full()

    def add_chunk(self, oid: bytes, blob: bytes) -> bool:
        """Append a stored chunk unless the set already has it; returns whether written."""
        h = oid.hex()
        if h in self.on_set:
            return False
        self._add(KIND_CHUNKS, T_CHUNK, oid, blob)
        self.on_set.add(h)
        return True

    def add_snapshot(self, oid: bytes, blob: bytes, name: str, time: str, size: int) -> None:
        """Append a snapshot manifest (stored object) with its summary beside it."""
        assert self.set is not None and self.media is not None
        a = self._open(KIND_SNAPSHOTS)
        where, number = self.media, int(a.header["file"])  # type: ignore[call-overload]
        before = a.bytes
        a.add_doc({"id": oid.hex(), "name": name, "time": time, "size": size})
        a.add(T_SNAPSHOT, oid, blob)
        self._count(a.bytes - before)
        self.cat.snapshots[oid.hex()] = SnapshotEntry(oid.hex(), name, time, self.set.uuid,
                                                      where.uuid, number, size)
        if a.eom:
            self._tape_full()

    def _write_catalog(self) -> None:
        assert self.set is not None and self.media is not None
        number = self.lib.drive.position()
        snaps = [s.to_doc() for s in self.cat.snapshots.values() if s.media_set == self.set.uuid]
        self.media.files.append(TapeFile(number, "catalog"))
        w = ArchiveWriter(self.lib.drive, KIND_CATALOG, self._header(number), self.mac_key)
        w.add_doc({"tape": self.media.to_doc(), "set": self.set.to_doc(), "snapshots": snaps})
        w.finish()

    def _tape_full(self) -> None:
        assert self.media is not None
        log.info("tape %s is nearly full: continuing on the next tape of the set",
                 self.media.label)
        self._close()
        self._write_catalog()
        self.media.full = True
        self.lib.unload()
        self._next_tape()

    def finish(self) -> None:
        """Close the archive, end the tape with its catalog, rewind."""
        if self.media is None:
            return
        self._close()
        self._write_catalog()
        self.lib.drive.rewind()
