"""Reading tapes back: a tape's own catalog, a full scan (for a catalog rebuild from the
tapes alone), and streaming a media set's objects into a sink for a restore.

Every frame is MAC-checked by ``ArchiveReader`` before it is handed on; chunks and
snapshots are additionally authenticated by the repository when they are stored.
Positioning is rewind + forward space only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmdr.errors import IntegrityError, LabelUnreadable, TapeError
from vmdr.tape.catalog import Catalog, SnapshotEntry
from vmdr.tape.formats import (
    KIND_CATALOG,
    KIND_CHUNKS,
    KIND_NAMES,
    KIND_SET,
    KIND_SNAPSHOTS,
    T_CHUNK,
    T_DOC,
    T_SNAPSHOT,
    ArchiveReader,
)
from vmdr.tape.library import Label, Library
from vmdr.tape.media import Media, MediaSet, Pool, TapeFile
from vmdr.timeutil import parse_time

log = logging.getLogger(__name__)

# sink(frame type, object id, stored object bytes)
Sink = Callable[[int, bytes, bytes], None]


@dataclass
class TapeScan:
    label: Label
    set_doc: dict[str, Any] | None = None  # the media-set label's document
    files: list[TapeFile] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    catalog: dict[str, Any] | None = None  # the tape's own catalog, when present


def _archive(lib: Library, mac_key: bytes | None, seal_key: bytes | None) -> ArchiveReader:
    return ArchiveReader(lib.drive, mac_key, seal_key)


def read_set_label(lib: Library, mac_key: bytes | None) -> dict[str, Any]:
    """File 1 of the loaded tape: its media set, pool and repository (MAC-checked)."""
    lib.drive.locate_file(1)
    try:
        r = _archive(lib, mac_key, None)
    except TapeError:
        raise LabelUnreadable("the tape has a label but no media set (never written)") \
            from None
    if r.kind != KIND_SET:
        raise LabelUnreadable("file 1 of the tape is not a media-set label")
    docs = r.docs()
    if not docs:
        raise IntegrityError("the media-set label is empty")
    return {**docs[0], "header": r.header}


def scan_tape(lib: Library, mac_key: bytes | None, seal_key: bytes | None = None,
              sink: Sink | None = None, full: bool = True) -> TapeScan:
    """Read the loaded tape from its label to the end of data, checking every frame.

    With ``full=False`` only the label, the set label and the tape's catalog (its last
    file) are read; with *sink*, every chunk and snapshot is handed to it."""
    label = lib.read_label()
    scan = TapeScan(label)
    try:
        scan.set_doc = read_set_label(lib, mac_key)
    except LabelUnreadable:
        return scan  # labelled, never written
    scan.files.append(TapeFile(1, "set"))
    if not full:
        count = lib.drive.move_to_eod()
        lib.drive.locate_file(count - 1)
        r = _archive(lib, mac_key, seal_key)
        if r.kind != KIND_CATALOG:
            raise IntegrityError(f"tape {label.label} does not end with a catalog")
        scan.catalog = r.docs()[0]
        return scan
    number = 2
    while True:
        try:
            r = _archive(lib, mac_key, seal_key)
        except TapeError:
            break  # end of data
        kind = KIND_NAMES.get(r.kind, "?")
        log.debug("tape %s file %d: %s", label.label, number, kind)
        ids: list[str] = []
        for f in r.frames():
            if f.type in (T_CHUNK, T_SNAPSHOT):
                ids.append(f.id.hex())
                if sink is not None:
                    sink(f.type, f.id, f.payload)
            elif f.type == T_DOC and r.kind == KIND_SNAPSHOTS:
                scan.snapshots.append({**f.json(), "file": number})
            elif f.type == T_DOC and r.kind == KIND_CATALOG:
                scan.catalog = f.json()
        words = {KIND_CHUNKS: "chunks", KIND_SNAPSHOTS: "snapshots", KIND_CATALOG: "catalog"}
        scan.files.append(TapeFile(number, words.get(r.kind, kind), ids))
        number += 1
    return scan


def merge_scan(cat: Catalog, scan: TapeScan, location: str = "library") -> Media:
    """Put what a tape says about itself into the catalog (rebuild)."""
    lab = scan.label
    media = cat.media.get(lab.uuid) or Media(lab.uuid, lab.label, lab.pool,
                                             parse_time(lab.created))
    media.location = cat.media[lab.uuid].location if lab.uuid in cat.media else location
    cat.media[lab.uuid] = media
    if lab.pool not in cat.pools:
        cat.pools[lab.pool] = Pool(lab.pool)
    if scan.set_doc is None:
        return media
    sd = scan.set_doc["set"]
    ms = cat.sets.get(sd["uuid"]) or MediaSet.from_doc(sd)
    cat.sets[ms.uuid] = ms
    if "pool" in scan.set_doc and lab.pool not in cat.pools:
        cat.pools[lab.pool] = Pool.from_doc(scan.set_doc["pool"])
    snaps: list[dict[str, Any]]
    if scan.catalog is not None and len(scan.files) <= 1:  # quick: trust the (MAC'd) catalog
        tape = Media.from_doc(scan.catalog["tape"])
        media.media_set, media.seq, media.files = tape.media_set, tape.seq, tape.files
        media.full, media.last_written, media.worm = tape.full, tape.last_written, tape.worm
        set_doc = MediaSet.from_doc(scan.catalog["set"])
        snaps = list(scan.catalog.get("snapshots", []))
    else:
        media.media_set, media.files = ms.uuid, scan.files
        seq = scan.catalog["tape"]["seq"] if scan.catalog else scan.set_doc["header"]["seq"]
        media.seq = int(seq)
        set_doc = MediaSet.from_doc(scan.catalog["set"]) if scan.catalog else ms
        if scan.catalog:
            t = Media.from_doc(scan.catalog["tape"])
            media.full, media.last_written, media.worm = t.full, t.last_written, t.worm
        snaps = [{"id": s["id"], "name": s["name"], "time": s["time"], "size": s["size"],
                  "media_set": ms.uuid, "tape": media.uuid, "file": s["file"]}
                 for s in scan.snapshots]
    for u in set_doc.media:
        if u not in ms.media:
            ms.media.append(u)
    if media.uuid not in ms.media:
        ms.media.append(media.uuid)
    ms.media.sort(key=lambda u: cat.media[u].seq if u in cat.media else 0)
    if set_doc.last_written and (ms.last_written is None or set_doc.last_written >
                                 ms.last_written):
        ms.last_written = set_doc.last_written
    for s in snaps:
        if s["tape"] == media.uuid or s["id"] not in cat.snapshots:
            cat.snapshots[s["id"]] = SnapshotEntry(**s)
    return media
