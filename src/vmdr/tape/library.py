"""A library: one changer (or none: a stand-alone drive) and one drive, with the steps every
job needs — load a tape by label, read and write labels, clean the drive when it asks.

Load order for a tape by label: the drive (already loaded?), then the slot whose barcode
matches, then — for changers without a barcode reader — each full slot, reading labels.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vmdr.errors import (
    IntegrityError,
    LabelUnreadable,
    MediaRefused,
    SlotEmpty,
    TapeError,
    UsageError,
)
from vmdr.tape.drive import Changer, Element, TapeDrive
from vmdr.tape.formats import KIND_LABEL, ArchiveReader, ArchiveWriter
from vmdr.tape.media import Media
from vmdr.timeutil import format_time

log = logging.getLogger(__name__)


@dataclass
class Label:
    label: str
    uuid: str
    pool: str
    created: str


class Library:
    def __init__(self, drive: TapeDrive, changer: Changer | None = None,
                 ready_timeout: float = 120.0, drive_number: int = 0) -> None:
        self.drive = drive
        self.changer = changer
        self.ready_timeout = ready_timeout
        self.drive_number = drive_number

    def close(self) -> None:
        self.drive.close()
        if self.changer:
            self.changer.close()

    # ---------------------------------------------------------------- labels
    def read_label(self) -> Label:
        """Rewind and read file 0; ``LabelUnreadable`` when it is not a vmdr label."""
        self.drive.wait_ready(self.ready_timeout)
        self.drive.rewind()
        try:
            r = ArchiveReader(self.drive, None, unreadable=LabelUnreadable)
            if r.kind != KIND_LABEL:
                raise LabelUnreadable("file 0 of the tape is not a vmdr label")
            list(r.frames())
        except IntegrityError as exc:
            raise LabelUnreadable(f"the tape label is unreadable: {exc}") from None
        except TapeError as exc:
            raise LabelUnreadable(f"the tape has no readable label ({exc})") from None
        h = r.header
        try:
            return Label(str(h["label"]), str(h["uuid"]), str(h["pool"]), str(h["created"]))
        except KeyError:
            raise LabelUnreadable("the tape label lacks fields") from None

    def write_label(self, label: str, pool: str, now: datetime) -> Media:
        """Write a new label (file 0) and nothing else: the tape is blank after it."""
        self.drive.wait_ready(self.ready_timeout)
        st = self.drive.status()
        if st.write_protected:
            raise MediaRefused(f"tape {label} is write-protected")
        self.drive.rewind()
        tape_uuid = str(uuid.uuid4())
        w = ArchiveWriter(self.drive, KIND_LABEL, {"label": label, "uuid": tape_uuid,
                                                   "pool": pool, "created": format_time(now)},
                          None)
        w.finish()
        self.drive.rewind()
        return Media(tape_uuid, label, pool, now)

    # ---------------------------------------------------------------- changer moves
    def _status(self) -> tuple[list[Element], list[Element]]:
        if self.changer is None:
            return [], []
        st = self.changer.status()
        return st.drives, st.slots

    def loaded_element(self) -> Element | None:
        drives, _ = self._status()
        return next((d for d in drives if d.number == self.drive_number and d.full), None)

    def unload(self) -> None:
        """Rewind, eject, and put the drive's tape back where it came from."""
        if self.changer is None:
            self.drive.rewind()
            return
        el = self.loaded_element()
        if el is None:
            return
        self.drive.unload()
        dest = el.source
        _, slots = self._status()
        if dest is None or any(s.number == dest and s.full for s in slots):
            free = [s for s in slots if s.kind == "slot" and not s.full]
            if not free:
                raise TapeError("no free slot to unload the drive into")
            dest = free[0].number
        self.changer.unload(dest, self.drive_number)

    def load_slot(self, slot: int) -> None:
        if self.changer is None:
            raise UsageError("this library has no changer: load the tape by hand")
        _, slots = self._status()
        el = next((s for s in slots if s.number == slot), None)
        if el is None:
            raise SlotEmpty(f"the changer has no slot {slot}")
        if not el.full:
            loaded = self.loaded_element()
            if loaded is not None and loaded.source == slot:
                return  # that slot's tape is in the drive already
            raise SlotEmpty(f"slot {slot} is empty")
        if self.loaded_element() is not None:
            self.unload()
        self.changer.load(slot, self.drive_number)
        self.drive.wait_ready(self.ready_timeout)

    def load_label(self, label: str) -> Label:
        """Get the tape *label* into the drive and return its label (checked)."""
        el = self.loaded_element()
        if self.changer is None or (el is not None and el.barcode == label):
            got = self.read_label()
            if got.label != label:
                raise SlotEmpty(f"the drive holds tape {got.label}, not {label}")
            return got
        _drives, slots = self._status()
        hit = next((s for s in slots if s.full and s.barcode == label), None)
        if hit is not None:
            self.load_slot(hit.number)
            got = self.read_label()
            if got.label != label:
                raise LabelUnreadable(f"slot {hit.number}'s barcode says {label} but its "
                                      f"label says {got.label}")
            return got
        if any(s.barcode for s in slots if s.full):
            raise SlotEmpty(f"tape {label} is not in the library")
        for s in slots:  # no barcode reader: read each label
            if s.full and s.kind == "slot":
                self.load_slot(s.number)
                try:
                    got = self.read_label()
                except LabelUnreadable:
                    continue
                if got.label == label:
                    return got
        raise SlotEmpty(f"tape {label} is not in the library")

    def clean_if_needed(self) -> bool:
        """When the drive asks for cleaning: load a cleaning tape (barcode ``CLN…``), wait
        until the drive is done with it, and put it back. Returns whether it cleaned."""
        if not self.drive.status().cleaning_needed or self.changer is None:
            return False
        _, slots = self._status()
        cln = next((s for s in slots if s.full and s.cleaning), None)
        if cln is None:
            log.warning("the tape drive asks for cleaning but the library has no CLN tape")
            return False
        if self.loaded_element() is not None:
            self.unload()
        self.changer.load(cln.number, self.drive_number)
        self.changer.unload(cln.number, self.drive_number)
        log.info("cleaned the drive with %s", cln.barcode)
        return True

    def inventory(self) -> list[dict[str, Any]]:
        """Every slot and drive with its barcode (no tape is moved)."""
        drives, slots = self._status()
        return [{"element": e.kind, "number": e.number, "full": e.full, "barcode": e.barcode,
                 "cleaning": e.cleaning, "source": e.source} for e in [*drives, *slots]]
