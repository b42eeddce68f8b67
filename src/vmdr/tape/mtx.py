"""The seed's tools as a back end: ``mtx`` (Debian ``mtx``) for the changer, ``mt``
(``mt-st``) for positioning, and ``read``/``write`` of fixed blocks on the drive's
non-rewinding device (``/dev/nstN``).

``parse_mtx_status`` reads ``mtx status`` as printed by many libraries: drives numbered
from 0 or 1 (or, from old mtx, not numbered at all), ``VolumeTag = X`` or ``VolumeTag=X``
padded to 36 characters or not, an ``AlternateVolumeTag``, no barcode reader at all, a
full slot or drive without a tag, ``Unknown Storage Element Loaded`` or no source clause,
``IMPORT/EXPORT`` slots anywhere in the numbering, empty slots with an empty tag, and
hundreds of slots. tests/unit/mtx_status/ holds canned outputs, each with where its shape
comes from (README.md there).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess

from vmdr.errors import MediaRefused, NoSpace, SlotEmpty, TapeError
from vmdr.tape.drive import Block, Changer, ChangerStatus, DriveStatus, Element, TapeDrive

# older mtx prints a lone drive without its number ("Data Transfer Element:Full")
_DRIVE = re.compile(r"^\s*Data Transfer Element(?:\s+(\d+))?\s*:\s*(Full|Empty)(.*)$")
_SLOT = re.compile(r"^\s*Storage Element\s+(\d+)(\s+IMPORT/EXPORT)?\s*:\s*(Full|Empty)(.*)$")
_LOADED = re.compile(r"\(\s*Storage Element\s+(\d+)\s+Loaded\s*\)")
_TAG = re.compile(r"VolumeTag\s*=\s*([^\s:]*)")
_HEADER = re.compile(r"Storage Changer .*:\s*(\d+)\s+Drives?,\s*(\d+)\s+Slots?\s*\(\s*(\d+)\s+"
                     r"Import/Export\s*\)")


def _tag(rest: str) -> str | None:
    m = _TAG.search(rest.replace("AlternateVolumeTag", "\0"))
    return (m.group(1) or None) if m else None


def parse_mtx_status(text: str) -> ChangerStatus:
    """Parse ``mtx status``; unknown lines are ignored, malformed element lines raise, and
    so does a listing shorter or longer than its header line announces (mtx prints the
    header from the same element counts, so a mismatch means cut-off output)."""
    drives: list[Element] = []
    slots: list[Element] = []
    header: tuple[int, int, int] | None = None
    for line in text.splitlines():
        if header is None and (h := _HEADER.search(line)):
            header = (int(h.group(1)), int(h.group(2)), int(h.group(3)))
        elif m := _DRIVE.match(line):
            full = m.group(2) == "Full"
            src = _LOADED.search(m.group(3))
            drives.append(Element("drive", int(m.group(1) or 0), full,
                                  _tag(m.group(3)) if full else None,
                                  int(src.group(1)) if src else None))
        elif m := _SLOT.match(line):
            full = m.group(3) == "Full"
            slots.append(Element("ie" if m.group(2) else "slot", int(m.group(1)), full,
                                 _tag(m.group(4)) if full else None))
        elif "Element" in line and ("Full" in line or "Empty" in line):
            raise TapeError(f"cannot parse mtx status line: {line.strip()!r}")
    if not drives and not slots:
        raise TapeError("mtx status printed no elements")
    if header is not None:
        got = (len(drives), len(slots), sum(1 for s in slots if s.kind == "ie"))
        if got != header:
            raise TapeError(f"mtx status listed {got[0]} drives, {got[1]} slots ({got[2]} "
                            f"import/export) but its header says {header[0]}, {header[1]} "
                            f"({header[2]}): cut-off output?")
    return ChangerStatus(drives, slots)


def _run(argv: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise TapeError(f"{argv[0]} is not installed (apt-get install mtx mt-st)") from None
    except subprocess.TimeoutExpired:
        raise TapeError(f"{' '.join(argv[:3])} did not finish within {timeout:g} s") from None
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        text = msg[-1] if msg else f"exit {p.returncode}"
        if "is Empty" in text or ("Empty" in text and "Source" in text):
            raise SlotEmpty(f"{argv[0]}: {text}")
        raise TapeError(f"{' '.join(argv[:1] + argv[3:])}: {text}")
    return p.stdout


class MtxChanger(Changer):
    def __init__(self, device: str, timeout: float = 600.0) -> None:
        self.device = device
        self.timeout = timeout

    def _mtx(self, *args: str) -> str:
        return _run(["mtx", "-f", self.device, *args], self.timeout)

    def status(self) -> ChangerStatus:
        return parse_mtx_status(self._mtx("status"))

    def load(self, slot: int, drive: int = 0) -> None:
        self._mtx("load", str(slot), str(drive))

    def unload(self, slot: int | None = None, drive: int = 0) -> None:
        if slot is None:
            self._mtx("unload")
        else:
            self._mtx("unload", str(slot), str(drive))

    def transfer(self, src: int, dst: int) -> None:
        self._mtx("transfer", str(src), str(dst))


_MT_FILE = re.compile(r"File number\s*=\s*(-?\d+)")


class MtDrive(TapeDrive):
    """``mt`` for positioning and status, plain ``read``/``write`` for data. The file
    counter is our own; ``mt``'s file number is only used for nothing."""

    def __init__(self, device: str, timeout: float = 600.0) -> None:
        self.device = device
        self.timeout = timeout
        self._fd: int | None = None
        self._mode = ""
        self._file = 0
        self._known = False
        self._eom = False
        self._wrote = False

    def _mt(self, *args: str) -> str:
        self._close_fd()
        return _run(["mt", "-f", self.device, *args], self.timeout)

    def _open(self, mode: str) -> int:
        if self._fd is not None and self._mode != mode:
            self._close_fd()
        if self._fd is None:
            flags = os.O_RDONLY if mode == "r" else os.O_RDWR
            try:
                self._fd = os.open(self.device, flags)
            except OSError as exc:
                if exc.errno == errno.EROFS or (exc.errno == errno.EACCES and mode == "w"):
                    raise MediaRefused(f"{self.device}: the tape is write-protected") from None
                raise TapeError(f"{self.device}: {exc.strerror}") from None
            self._mode = mode
        return self._fd

    def _close_fd(self) -> None:
        """Closing after writing writes a filemark (the st driver's rule)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            if self._mode == "w" and self._wrote:
                self._file += 1
                self._wrote = False

    def status(self) -> DriveStatus:
        try:
            out = self._mt("status")
        except TapeError:
            return DriveStatus(False, False)
        words = set(re.findall(r"[A-Z_]+", out.split("status bits", 1)[-1]))
        online = "ONLINE" in words
        return DriveStatus(online and "DR_OPEN" not in words, online,
                           "WR_PROT" in words, "EOT" in words or self._eom,
                           "CLN" in words, self._file if self._known else None)

    def rewind(self) -> None:
        self._mt("rewind")
        self._file, self._known, self._eom = 0, True, False

    def forward_space_files(self, count: int) -> None:
        if count <= 0:
            return
        try:
            self._mt("fsf", str(count))
        except TapeError as exc:
            self._known = False
            raise TapeError(f"end of data while spacing {count} files: {exc}") from None
        self._file += count

    def move_to_eod(self) -> int:
        """Rewind and count files by spacing one at a time (our own counter, not READ
        POSITION)."""
        self.rewind()
        while True:
            try:
                self._mt("fsf", "1")
            except TapeError:
                break
            self._file += 1
        self.locate_file(self._file)
        return self._file

    def position(self) -> int:
        return self._file

    def read_block(self) -> bytes | None:
        fd = self._open("r")
        try:
            data = os.read(fd, self.block_size)
        except OSError as exc:
            raise TapeError(f"{self.device}: read failed: {exc.strerror}") from None
        if not data:
            self._file += 1
            return None
        return data

    def write_block(self, data: Block) -> bool:
        fd = self._open("w")
        for attempt in (1, 2):
            try:
                n = os.write(fd, data)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and attempt == 1 and not self._eom:
                    self._eom = True  # early warning: st reports it once, then writes on
                    continue
                if exc.errno == errno.ENOSPC:
                    raise NoSpace(f"{self.device}: end of medium") from None
                if exc.errno in (errno.EROFS, errno.EACCES):
                    raise MediaRefused(f"{self.device}: the tape is write-protected") from None
                raise TapeError(f"{self.device}: write failed: {exc.strerror}") from None
            if n != len(data):
                raise TapeError(f"{self.device}: short write ({n} of {len(data)} bytes)")
            self._wrote = True
            return self._eom
        return self._eom

    def write_filemark(self) -> None:
        if self._fd is not None and self._mode == "w" and self._wrote:
            self._close_fd()  # the close writes it
            return
        self._mt("weof", "1")
        self._file += 1

    def unload(self) -> None:
        self._mt("offline")
        self._file, self._known = 0, False

    def close(self) -> None:
        self._close_fd()
