"""A file-backed tape library: one drive-and-changer in a directory.

A debugging and demo back end for users without hardware, in the spirit of PBS's
``VirtualTapeDrive``. It is *not* tested hardware and says nothing about real drives.

Format (version 1), all JSON written atomically::

    LIBRARY/library.json   {"format": "vmdr-virtual-library", "version": 1, "slots": 8,
                            "ie_slots": 2, "drives": 1, "capacity": BYTES,
                            "early_warning": BYTES}
    LIBRARY/state.json     {"slots": {"1": "VMD001L8", ...},      # slot -> barcode
                            "drives": {"0": {"tape": "VMD003L8", "source": 3,
                                             "file": 2, "block": 0}},
                            "needs_cleaning": false}
    LIBRARY/tapes/BARCODE/tape.json   {"files": 4, "write_protected": false,
                                       "cleaning": false, "cleanings": 0}
    LIBRARY/tapes/BARCODE/file-00003  the bytes of tape file 3: full blocks, the last one
                                       possibly short, so block i is at i × block size

Slots 1..slots are storage slots, slots+1..slots+ie_slots are import/export slots. A
cleaning tape has a barcode starting with ``CLN``. Writing anywhere but at the end of data
deletes every later file, as on tape. The end-of-medium warning comes when the tape holds
more than ``capacity - early_warning`` bytes; a block that would pass ``capacity`` raises
``NoSpace``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmdr.errors import MediaRefused, NoSpace, SlotEmpty, TapeError, UsageError
from vmdr.tape.drive import (
    BLOCK_SIZE,
    Block,
    Changer,
    ChangerStatus,
    DriveStatus,
    Element,
    Segments,
    TapeDrive,
)

FORMAT = "vmdr-virtual-library"
_IOV_MAX = 1024  # Linux's limit of pieces per writev
VERSION = 1


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


class VirtualLibrary:
    """The directory; ``changer()`` and ``drive()`` give the two device interfaces."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.config = json.loads((self.root / "library.json").read_text())
        except (OSError, ValueError):
            raise UsageError(f"{self.root} is not a vmdr virtual tape library "
                             "(create one with 'vmdr tape virtual-create')") from None
        if self.config.get("format") != FORMAT or self.config.get("version") != VERSION:
            raise UsageError(f"{self.root}: unsupported virtual library format")
        self.slots = int(self.config["slots"])
        self.ie_slots = int(self.config["ie_slots"])
        self.capacity = int(self.config["capacity"])
        self.early_warning = int(self.config["early_warning"])

    @classmethod
    def create(cls, root: str | Path, slots: int = 8, ie_slots: int = 2,
               capacity: int = 1 << 30, early_warning: int | None = None) -> VirtualLibrary:
        r = Path(root)
        if (r / "library.json").exists():
            raise UsageError(f"{r} already holds a virtual tape library")
        if slots < 1 or ie_slots < 0 or capacity < 4 * BLOCK_SIZE:
            raise UsageError("a virtual library needs ≥1 slot and ≥1 MiB tapes")
        (r / "tapes").mkdir(parents=True, exist_ok=True)
        warn = early_warning if early_warning is not None else max(capacity // 32,
                                                                   4 * BLOCK_SIZE)
        _write_json(r / "library.json", {"format": FORMAT, "version": VERSION, "slots": slots,
                                         "ie_slots": ie_slots, "drives": 1,
                                         "capacity": capacity, "early_warning": warn})
        _write_json(r / "state.json", {"slots": {}, "drives": {}, "needs_cleaning": False})
        return cls(r)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.root / "state.json").read_text())
        return doc

    def save_state(self, doc: dict[str, Any]) -> None:
        _write_json(self.root / "state.json", doc)

    def tape_dir(self, barcode: str) -> Path:
        return self.root / "tapes" / barcode

    def tape_meta(self, barcode: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.tape_dir(barcode) / "tape.json").read_text())
        return doc

    def save_tape_meta(self, barcode: str, doc: dict[str, Any]) -> None:
        _write_json(self.tape_dir(barcode) / "tape.json", doc)

    def add_tape(self, barcode: str, slot: int, write_protected: bool = False) -> None:
        """Put a new blank tape into *slot* (``CLN…`` barcodes are cleaning tapes)."""
        st = self.state()
        if not 1 <= slot <= self.slots + self.ie_slots:
            raise UsageError(f"no slot {slot} (1..{self.slots + self.ie_slots})")
        if str(slot) in st["slots"]:
            raise UsageError(f"slot {slot} is full")
        d = self.tape_dir(barcode)
        if d.exists():
            raise UsageError(f"a tape {barcode} already exists")
        d.mkdir(parents=True)
        self.save_tape_meta(barcode, {"files": 0, "write_protected": write_protected,
                                      "cleaning": barcode.upper().startswith("CLN"),
                                      "cleanings": 0})
        st["slots"][str(slot)] = barcode
        self.save_state(st)

    def set_write_protected(self, barcode: str, on: bool) -> None:
        meta = self.tape_meta(barcode)
        meta["write_protected"] = on
        self.save_tape_meta(barcode, meta)

    def set_needs_cleaning(self, on: bool = True) -> None:
        st = self.state()
        st["needs_cleaning"] = on
        self.save_state(st)

    def remove_tape(self, barcode: str) -> None:
        """Take a tape out of the library for good (the vault, a shredder)."""
        st = self.state()
        st["slots"] = {k: v for k, v in st["slots"].items() if v != barcode}
        st["drives"] = {k: v for k, v in st["drives"].items() if v.get("tape") != barcode}
        self.save_state(st)
        shutil.rmtree(self.tape_dir(barcode), ignore_errors=True)

    def changer(self) -> VirtualChanger:
        return VirtualChanger(self)

    def drive(self, number: int = 0) -> VirtualDrive:
        return VirtualDrive(self, number)


class VirtualChanger(Changer):
    def __init__(self, lib: VirtualLibrary) -> None:
        self.lib = lib

    def status(self) -> ChangerStatus:
        st = self.lib.state()
        drives = []
        for n in range(int(self.lib.config.get("drives", 1))):
            d = st["drives"].get(str(n))
            drives.append(Element("drive", n, bool(d), d["tape"] if d else None,
                                  d["source"] if d else None))
        slots = []
        for n in range(1, self.lib.slots + self.lib.ie_slots + 1):
            bc = st["slots"].get(str(n))
            slots.append(Element("slot" if n <= self.lib.slots else "ie", n, bc is not None, bc))
        return ChangerStatus(drives, slots)

    def load(self, slot: int, drive: int = 0) -> None:
        st = self.lib.state()
        bc = st["slots"].get(str(slot))
        if bc is None:
            raise SlotEmpty(f"slot {slot} is empty")
        if str(drive) in st["drives"]:
            raise TapeError(f"drive {drive} is full (unload it first)")
        del st["slots"][str(slot)]
        st["drives"][str(drive)] = {"tape": bc, "source": slot, "file": 0, "block": 0}
        meta = self.lib.tape_meta(bc)
        if meta.get("cleaning"):
            st["needs_cleaning"] = False
            meta["cleanings"] = int(meta.get("cleanings", 0)) + 1
            self.lib.save_tape_meta(bc, meta)
        self.lib.save_state(st)

    def unload(self, slot: int | None = None, drive: int = 0) -> None:
        st = self.lib.state()
        d = st["drives"].get(str(drive))
        if d is None:
            raise SlotEmpty(f"drive {drive} is empty")
        dst = slot if slot is not None else int(d["source"])
        if str(dst) in st["slots"]:
            raise TapeError(f"slot {dst} is full")
        st["slots"][str(dst)] = d["tape"]
        del st["drives"][str(drive)]
        self.lib.save_state(st)

    def transfer(self, src: int, dst: int) -> None:
        st = self.lib.state()
        bc = st["slots"].get(str(src))
        if bc is None:
            raise SlotEmpty(f"slot {src} is empty")
        if str(dst) in st["slots"]:
            raise TapeError(f"slot {dst} is full")
        if not 1 <= dst <= self.lib.slots + self.lib.ie_slots:
            raise UsageError(f"no slot {dst}")
        st["slots"][str(dst)] = st["slots"].pop(str(src))
        self.lib.save_state(st)


class _Stream:
    """The open file and head position during a run of reads or writes, so streaming a
    block costs one file operation, not a state load and save."""

    def __init__(self, barcode: str, file: int, block: int, used: int,
                 fh: Any, writing: bool) -> None:
        self.barcode, self.file, self.block, self.used = barcode, file, block, used
        self.fh, self.writing = fh, writing
        self.short = False


class VirtualDrive(TapeDrive):
    """The library's drive. The head position is saved in ``state.json`` after every
    move and at the end of each run of reads or writes, so it survives between commands
    like a real drive's."""

    def __init__(self, lib: VirtualLibrary, number: int = 0) -> None:
        self.lib = lib
        self.number = number
        self._s: _Stream | None = None
        # no write-behind thread: page-cache writes are fast, and a second writing thread
        # beside the readers made the kernel time bimodal (bench/tape.py, measured)
        self.write_behind = 0

    def _loaded(self) -> tuple[dict[str, Any], dict[str, Any]]:
        st = self.lib.state()
        d = st["drives"].get(str(self.number))
        if d is None:
            raise TapeError(f"no tape in drive {self.number}")
        return st, d

    def _file(self, bc: str, n: int) -> Path:
        return self.lib.tape_dir(bc) / f"file-{n:05d}"

    def _used(self, bc: str) -> int:
        return sum(p.stat().st_size for p in self.lib.tape_dir(bc).glob("file-*"))

    def _end_stream(self) -> None:
        """Close a run of reads or writes: a write run ends with a filemark (as the
        kernel's st driver writes one on close); the position is saved."""
        s, self._s = self._s, None
        if s is None:
            return
        s.fh.close()
        st, d = self._loaded()
        if s.writing:
            meta = self.lib.tape_meta(s.barcode)
            meta["files"] = s.file + 1
            self.lib.save_tape_meta(s.barcode, meta)
            d["file"], d["block"] = s.file + 1, 0
        else:
            d["file"], d["block"] = s.file, s.block
        self.lib.save_state(st)

    def status(self) -> DriveStatus:
        self._end_stream_reads()
        st = self.lib.state()
        d = st["drives"].get(str(self.number))
        if d is None:
            return DriveStatus(False, False, cleaning_needed=bool(st.get("needs_cleaning")))
        meta = self.lib.tape_meta(d["tape"])
        used = self._s.used if self._s else self._used(d["tape"])
        return DriveStatus(
            True, not meta.get("cleaning"), bool(meta.get("write_protected")),
            used >= self.lib.capacity - self.lib.early_warning,
            bool(st.get("needs_cleaning")), self._s.file if self._s else int(d["file"]))

    def _end_stream_reads(self) -> None:
        if self._s is not None and not self._s.writing:
            self._end_stream()

    def _move(self, file: int, block: int = 0) -> None:
        st, d = self._loaded()
        d["file"], d["block"] = file, block
        self.lib.save_state(st)

    def rewind(self) -> None:
        self._end_stream()
        self._move(0)

    def forward_space_files(self, count: int) -> None:
        self._end_stream()
        _st, d = self._loaded()
        files = int(self.lib.tape_meta(d["tape"])["files"])
        target = int(d["file"]) + count
        if count < 0 or target > files:
            self._move(files)
            raise TapeError(f"end of data after {files} files while spacing to file {target}")
        self._move(target)

    def move_to_eod(self) -> int:
        self._end_stream()
        _, d = self._loaded()
        files = int(self.lib.tape_meta(d["tape"])["files"])
        self._move(files)
        return files

    def position(self) -> int:
        if self._s is not None:
            return self._s.file
        return int(self._loaded()[1]["file"])

    def read_block(self) -> bytes | None:
        if self._s is not None and self._s.writing:
            self._end_stream()
        if self._s is None:
            _, d = self._loaded()
            bc, f, b = d["tape"], int(d["file"]), int(d["block"])
            meta = self.lib.tape_meta(bc)
            if meta.get("cleaning"):
                raise TapeError("a cleaning tape is loaded")
            if f >= int(meta["files"]):
                raise TapeError(f"end of data: tape {bc} has {meta['files']} files")
            fh = open(self._file(bc, f), "rb")  # noqa: SIM115 (closed by _end_stream)
            fh.seek(b * self.block_size)
            self._s = _Stream(bc, f, b, 0, fh, writing=False)
        s = self._s
        data: bytes = s.fh.read(self.block_size)
        if not data:
            s.file, s.block = s.file + 1, 0
            self._end_stream()
            return None
        s.block += 1
        return data

    def _write_stream(self) -> _Stream:
        """The open write run, started at the head (discarding what follows it)."""
        self._end_stream_reads()
        if self._s is None:
            _, d = self._loaded()
            bc, f, b = d["tape"], int(d["file"]), int(d["block"])
            meta = self.lib.tape_meta(bc)
            if meta.get("write_protected"):
                raise MediaRefused(f"tape {bc} is write-protected")
            if meta.get("cleaning"):
                raise TapeError("a cleaning tape is loaded")
            # writing in the middle: everything after the head is gone
            for p in self.lib.tape_dir(bc).glob("file-*"):
                if int(p.name[5:]) > f:
                    p.unlink()
            # unbuffered: a block goes to the kernel in one write, not through a copy
            fh = open(self._file(bc, f), "ab", buffering=0)  # noqa: SIM115 (_end_stream)
            if os.fstat(fh.fileno()).st_size != b * self.block_size:
                # only when it changes anything: ext4 flushes a truncated file on close
                fh.truncate(b * self.block_size)
            meta["files"] = f
            self.lib.save_tape_meta(bc, meta)
            self._s = _Stream(bc, f, b, self._used(bc), fh, writing=True)
        return self._s

    def write_block(self, data: Block) -> bool:
        return self.write_gathered([[data]])

    def write_blocks(self, blocks: Sequence[Block]) -> bool:
        return self.write_gathered([[b] for b in blocks])

    def write_gathered(self, blocks: Sequence[Segments]) -> bool:
        """Append blocks to the current file: their pieces go to ``writev`` as they are."""
        sizes = [sum(len(p) for p in segs) for segs in blocks]
        if not blocks or any(n > self.block_size or n == 0 for n in sizes):
            raise UsageError(f"a tape block is 1..{self.block_size} bytes")
        s = self._write_stream()
        if s.short or any(n < self.block_size for n in sizes[:-1]):
            raise UsageError("only the last block of a tape file may be short")
        total = sum(sizes)
        if s.used + total > self.lib.capacity:
            # write the blocks that fit, then report the end of the medium
            fit = 0
            while s.used + sum(sizes[:fit + 1]) <= self.lib.capacity:
                fit += 1
            if fit:
                self.write_gathered(blocks[:fit])
            raise NoSpace(f"tape {s.barcode} is full (end of medium)")
        fd = s.fh.fileno()
        pieces = [p for segs in blocks for p in segs]
        for i in range(0, len(pieces), _IOV_MAX):
            batch = pieces[i:i + _IOV_MAX]
            done = os.writev(fd, batch)
            if done < sum(len(p) for p in batch):  # a partial writev (rare): the rest
                rest = memoryview(b"".join(batch))[done:]
                while rest:
                    rest = rest[os.write(fd, rest):]
        s.used += total
        s.block += len(blocks)
        s.short = sizes[-1] < self.block_size
        return s.used >= self.lib.capacity - self.lib.early_warning

    def write_filemark(self) -> None:
        self._end_stream_reads()
        if self._s is not None:
            self._end_stream()  # ends the file with its filemark
            return
        st, d = self._loaded()
        bc, f = d["tape"], int(d["file"])
        meta = self.lib.tape_meta(bc)
        if meta.get("write_protected"):
            raise MediaRefused(f"tape {bc} is write-protected")
        for p in self.lib.tape_dir(bc).glob("file-*"):
            if int(p.name[5:]) >= f:
                p.unlink()
        self._file(bc, f).touch()
        meta["files"] = f + 1
        self.lib.save_tape_meta(bc, meta)
        d["file"], d["block"] = f + 1, 0
        self.lib.save_state(st)

    def unload(self) -> None:
        self.rewind()

    def close(self) -> None:
        if self._s is not None:
            self._end_stream()
