"""Tape jobs without a repository: pools, ``label``, ``inventory``, ``export``/``import``
to and from a vault, and the ``vault`` checklist."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from vmdr.errors import LabelUnreadable, MediaRefused, SlotEmpty, TapeError, UsageError
from vmdr.tape.catalog import Catalog, CatalogBackend, VaultEvent
from vmdr.tape.library import Library
from vmdr.tape.media import Media, Pool, check_allocation, overwrite_refusal, parse_retention
from vmdr.timeutil import Clock, format_time, utcnow


def add_pool(store: CatalogBackend, pool: Pool, maxslot: int | None = None) -> Pool:
    """Create or change a pool; a ``rotation`` pool needs *maxslot* (the seed's highest
    slot) the first time."""
    check_allocation(pool.allocation)
    parse_retention(pool.retention)
    if pool.allocation == "rotation":
        rot = store.rotation(pool.name, maxslot)
        if maxslot is not None:
            rot.maxslot = maxslot
        store.save_rotation(pool.name, rot)
    with store.locked() as cat:
        cat.pools[pool.name] = pool
    return pool


def label_tape(lib: Library, store: CatalogBackend, pool: str, *, slot: int | None = None,
               label: str | None = None, force: bool = False,
               clock: Clock = utcnow) -> Media:
    """Label the tape in *slot* (or the one in the drive): barcode or *label* as its name.

    A tape that already has a vmdr label is relabelled only with *force*, and never while
    its pool's retention protects it."""
    now = clock()
    with store.locked() as cat:
        cat.pool(pool)
        if slot is not None:
            lib.load_slot(slot)
        el = lib.loaded_element()
        name = label or (el.barcode if el else None)
        if not name:
            raise UsageError("this tape has no barcode: give --label NAME")
        if el is not None and el.cleaning:
            raise MediaRefused(f"{name} is a cleaning tape")
        try:
            old = lib.read_label()
        except LabelUnreadable:
            old = None
        if old is not None:
            known = cat.media.get(old.uuid)
            if not force:
                raise MediaRefused(f"tape {old.label} already has a vmdr label (pool "
                                   f"{old.pool}); --force relabels it")
            if known is not None:
                why = overwrite_refusal(known, cat.pools.get(known.pool, Pool(known.pool)),
                                        cat.sets, now)
                if why and known.media_set is not None:
                    raise MediaRefused(f"refusing to relabel: {why}")
                del cat.media[old.uuid]
        m = lib.write_label(name, pool, now)
        cat.media[m.uuid] = m
    return m


def inventory(lib: Library, store: CatalogBackend, read_labels: bool = False
              ) -> list[dict[str, Any]]:
    """Every slot and drive with its barcode and what the catalog knows of that tape;
    with *read_labels*, every tape is loaded and its label read (and the catalog learns
    tapes it did not know)."""
    rows = lib.inventory()
    with store.locked() as cat:
        if read_labels:
            for r in rows:
                if r["full"] and not r["cleaning"] and r["element"] != "drive":
                    lib.load_slot(int(r["number"]))
                    try:
                        lab = lib.read_label()
                        r["label"], r["uuid"], r["pool"] = lab.label, lab.uuid, lab.pool
                        if lab.uuid not in cat.media:
                            from vmdr.timeutil import parse_time

                            cat.media[lab.uuid] = Media(lab.uuid, lab.label, lab.pool,
                                                        parse_time(lab.created))
                    except LabelUnreadable as exc:
                        r["label"], r["error"] = None, exc.message
                    lib.unload()
        for r in rows:
            m = cat.by_label(str(r.get("label") or r["barcode"] or ""))
            if m is not None:
                r.update(label=m.label, pool=m.pool, media_set=m.media_set, seq=m.seq,
                         full=r["full"], tape_full=m.full, location=m.location)
    return rows


@dataclass
class Move:
    label: str
    slot: int | None
    to: str


def _tapes(cat: Catalog, media_set: str | None, labels: list[str]) -> list[Media]:
    if media_set:
        hits = [u for u in cat.sets if u.startswith(media_set)]
        if len(hits) != 1:
            raise UsageError(f"no single media set matches {media_set!r}")
        return cat.set_media(hits[0])
    if not labels:
        raise UsageError("give --media-set or tape labels")
    return [cat.need_label(lbl) for lbl in labels]


def export_tapes(lib: Library, store: CatalogBackend, vault: str, media_set: str | None = None,
                 labels: list[str] | None = None, clock: Clock = utcnow) -> list[Move]:
    """Move tapes to the import/export slots and record them as in *vault*."""
    now = clock()
    moves: list[Move] = []
    with store.locked() as cat:
        tapes = _tapes(cat, media_set, labels or [])
        if lib.changer is not None and lib.loaded_element() is not None:
            lib.unload()
        for m in tapes:
            if m.in_vault:
                continue
            slot = None
            if lib.changer is not None:
                st = lib.changer.status()
                el = st.find(m.label)
                if el is None:
                    raise SlotEmpty(f"tape {m.label} is not in the library")
                free = [s for s in st.ie_slots if not s.full]
                if el.kind != "ie":
                    if not free:
                        raise TapeError(f"no free import/export slot for {m.label}: empty "
                                        "them and run the export again")
                    lib.changer.transfer(el.number, free[0].number)
                    slot = free[0].number
                else:
                    slot = el.number
            m.location = f"vault:{vault}"
            cat.history.append(VaultEvent(now, m.label, m.location))
            moves.append(Move(m.label, slot, m.location))
    return moves


def import_tapes(lib: Library, store: CatalogBackend, labels: list[str],
                 clock: Clock = utcnow) -> list[Move]:
    """Record tapes back from their vault; move them from import/export to storage slots."""
    now = clock()
    moves: list[Move] = []
    with store.locked() as cat:
        for lbl in labels:
            m = cat.by_label(lbl)  # None: the catalog was lost; the rebuild will learn it
            slot = None
            if lib.changer is not None:
                st = lib.changer.status()
                el = st.find(lbl)
                if el is None:
                    raise SlotEmpty(f"tape {lbl} is not in the library: put it into an "
                                    "import/export slot first")
                if el.kind == "ie":
                    free = [s for s in st.storage_slots if not s.full]
                    if not free:
                        raise TapeError("no free storage slot")
                    lib.changer.transfer(el.number, free[0].number)
                    slot = free[0].number
                else:
                    slot = el.number
            elif m is None:
                raise SlotEmpty(f"no tape {lbl!r} in the catalog")
            if m is not None:
                m.location = "library"
            cat.history.append(VaultEvent(now, lbl, "library"))
            moves.append(Move(lbl, slot, "library"))
    return moves


@dataclass
class VaultLine:
    label: str
    pool: str
    media_set: str | None
    location: str
    last_written: datetime | None
    retained_until: datetime | None  # None: forever or never written
    action: str  # "send to vault X" | "recall from vault X" | "stay"
    since: datetime | None = None  # when it went to its current location

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "pool": self.pool, "media_set": self.media_set,
                "location": self.location, "action": self.action,
                "last_written": format_time(self.last_written) if self.last_written else None,
                "retained_until": (format_time(self.retained_until)
                                   if self.retained_until else None),
                "since": format_time(self.since) if self.since else None}


def vault_report(cat: Catalog, now: datetime) -> list[VaultLine]:
    """Which tapes are where, and what to carry: a pool with a vault sends the tapes of
    its written sets there once the set is closed or the tape is full (the open tape of
    a ``continue`` pool stays to be appended to); a tape in a vault whose retention has
    run out comes back for reuse."""
    out = []
    for m in sorted(cat.media.values(), key=lambda m: (m.pool, m.label)):
        pool = cat.pools.get(m.pool, Pool(m.pool))
        ms = cat.sets.get(m.media_set or "")
        last = (ms.last_written if ms and ms.last_written else m.last_written)
        keep = parse_retention(pool.retention)
        until = last + timedelta(seconds=keep) if last and keep is not None else None
        action = "stay"
        if m.in_vault:
            if until is not None and now >= until and not (m.worm or pool.worm):
                action = f"recall from vault {m.in_vault}"
        elif pool.vault and ms is not None and (ms.closed or m.full):
            action = f"send to vault {pool.vault}"
        moved = [e.time for e in cat.history if e.tape == m.label]
        out.append(VaultLine(m.label, m.pool, m.media_set, m.location, last, until, action,
                             max(moved) if moved else None))
    return out


def vault_checklist(lines: list[VaultLine], now: datetime) -> str:
    """The printable checklist for whoever carries the box."""
    rows = [f"Tape vault checklist — {format_time(now)[:16].replace('T', ' ')} UTC", ""]
    todo = [v for v in lines if v.action != "stay"]
    if todo:
        rows.append("To do (tick when done, sign at the bottom):")
        for v in todo:
            rows.append(f"  [ ] {v.action:<28} {v.label:<10} pool {v.pool:<10} "
                        f"set {(v.media_set or '-')[:8]}")
    else:
        rows.append("Nothing to carry today.")
    rows += ["", "Where every tape is:"]
    for v in lines:
        until = (format_time(v.retained_until)[:10] if v.retained_until
                 else "-" if v.last_written is None else "forever")
        rows.append(f"  {v.label:<10} {v.pool:<10} {v.location:<22} set "
                    f"{(v.media_set or '-')[:8]:<8} kept until {until}")
    rows += ["", "Carried by: ____________________   Date: __________   Signature: ________"]
    return "\n".join(rows) + "\n"
