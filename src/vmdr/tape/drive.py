"""The device layer: a ``TapeDrive`` and a ``Changer``, each a small ABC with its contract.

Three back ends implement both (``virtual``, ``mtx``, ``sgio``), and one contract suite
(tests/unit/test_tape_contract.py) runs over all three. Everything above this layer
(formats, pool writer, jobs) speaks only these interfaces.

Positioning contract: the drive keeps *its own* file counter (``position()``), updated on
every rewind, forward space, filemark and end-of-data move; nothing trusts READ POSITION
(tgt returns zeros there). Moving backwards is done by rewinding and spacing forward,
never by backward spacing (tgt lands one block off).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmdr.errors import DriveNotReady

BLOCK_SIZE = 256 << 10  # every vmdr tape file is written in fixed 256 KiB blocks
Block = bytes | bytearray | memoryview  # what write_block takes (never kept after the call)
Segments = Sequence[Block]  # one block as pieces (a gather list) that add up to it


@dataclass(frozen=True)
class DriveStatus:
    """What the drive says about itself and the loaded tape."""

    loaded: bool
    ready: bool
    write_protected: bool = False
    eom_warning: bool = False  # early warning: end of medium is near
    cleaning_needed: bool = False
    file_number: int | None = None  # our own counter (None: unknown, rewind first)


@dataclass(frozen=True)
class Element:
    """One element of a changer: a storage slot, an import/export slot or a drive."""

    kind: str  # "slot" | "ie" | "drive"
    number: int  # 1-based slot number (ie slots continue after the storage slots); drives 0-based
    full: bool
    barcode: str | None = None
    source: int | None = None  # drives: the slot the tape came from

    @property
    def cleaning(self) -> bool:
        return bool(self.barcode and self.barcode.upper().startswith("CLN"))


@dataclass(frozen=True)
class ChangerStatus:
    drives: list[Element] = field(default_factory=list)
    slots: list[Element] = field(default_factory=list)  # storage and import/export slots

    def slot(self, number: int) -> Element | None:
        return next((s for s in self.slots if s.number == number), None)

    def find(self, barcode: str) -> Element | None:
        """The slot or drive holding the tape with *barcode*."""
        return next((e for e in [*self.drives, *self.slots] if e.full and e.barcode == barcode),
                    None)

    @property
    def storage_slots(self) -> list[Element]:
        return [s for s in self.slots if s.kind == "slot"]

    @property
    def ie_slots(self) -> list[Element]:
        return [s for s in self.slots if s.kind == "ie"]


class TapeDrive(abc.ABC):
    """A sequential tape drive, written and read in fixed ``BLOCK_SIZE`` blocks.

    Files are numbered from 0; ``position()`` is the number of the file the head is in.
    Writing anywhere but at the end of data discards everything after the head (tape
    semantics). ``write_block`` raises ``NoSpace`` at the physical end of the medium;
    ``write_block`` returns True (and ``status().eom_warning`` turns true) some megabytes
    before it, so the writer can close its file, write the catalog and ask for the next
    tape.
    """

    block_size: int = BLOCK_SIZE
    # bytes a WriteBehind may queue in front of the drive: after the early warning the
    # writer adds at most this much (plus one frame) before it closes the file, so it must
    # sit well inside the warning zone (LTO's is far larger than this); 0: none
    write_behind: int = 8 << 20

    @abc.abstractmethod
    def status(self) -> DriveStatus:
        """The drive's state; never blocks for long."""

    @abc.abstractmethod
    def rewind(self) -> None:
        """Move to the beginning of the tape (file 0, block 0)."""

    @abc.abstractmethod
    def forward_space_files(self, count: int) -> None:
        """Skip *count* filemarks forward; land at the start of file ``position() + count``.
        Raises ``TapeError`` when the end of data comes first."""

    @abc.abstractmethod
    def move_to_eod(self) -> int:
        """Move to the end of data (after the last filemark); return the file count."""

    @abc.abstractmethod
    def read_block(self) -> bytes | None:
        """The next block of the current file, or ``None`` at its filemark (the head then
        stands at the start of the next file)."""

    @abc.abstractmethod
    def write_block(self, data: Block) -> bool:
        """Write one block of at most ``block_size`` bytes (short only as a file's last);
        return True once the end-of-medium early warning zone is reached."""

    def write_blocks(self, blocks: Sequence[Block]) -> bool:
        """Write several blocks in order (a back end may do it in one system call);
        return the early warning as ``write_block`` does."""
        eom = False
        for b in blocks:
            eom = self.write_block(b) or eom
        return eom

    def write_gathered(self, blocks: Sequence[Segments]) -> bool:
        """Write blocks each given as pieces (frame header, payload, MAC...) without the
        caller copying them into one buffer first. The default joins each block; a back
        end that can gather (``writev``) writes the pieces as they are."""
        return self.write_blocks([bytearray().join(segs) for segs in blocks])  # SG_IO: no copy

    @abc.abstractmethod
    def write_filemark(self) -> None:
        """End the current file."""

    @abc.abstractmethod
    def position(self) -> int:
        """The file number the head is in, by our own count."""

    def unload(self) -> None:
        """Rewind and eject, for changers that need it before a move (default: rewind)."""
        self.rewind()

    def close(self) -> None:
        """Release the device."""

    def locate_file(self, number: int) -> None:
        """Go to the start of file *number*: rewind, then forward space (never backwards)."""
        self.rewind()
        if number:
            self.forward_space_files(number)

    def wait_ready(self, timeout: float, poll: float = 0.5,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> DriveStatus:
        """Poll ``status()`` until the drive is loaded and ready; ``DriveNotReady`` after
        *timeout* seconds (never a hang)."""
        end = clock() + timeout
        while True:
            st = self.status()
            if st.loaded and st.ready:
                return st
            if clock() >= end:
                raise DriveNotReady(f"the tape drive did not become ready within {timeout:g} s"
                                    f" ({'no tape loaded' if not st.loaded else 'not ready'})")
            sleep(poll)


class Changer(abc.ABC):
    """A media changer (autoloader / library) with storage slots, import/export slots and
    drives. Slot numbers are 1-based as ``mtx`` prints them; drives are 0-based."""

    @abc.abstractmethod
    def status(self) -> ChangerStatus:
        """Every element with its barcode and, for drives, the source slot."""

    @abc.abstractmethod
    def load(self, slot: int, drive: int = 0) -> None:
        """Move the tape in *slot* into *drive*. ``SlotEmpty`` when there is none."""

    @abc.abstractmethod
    def unload(self, slot: int | None = None, drive: int = 0) -> None:
        """Move the tape in *drive* back to *slot* (default: where it came from)."""

    @abc.abstractmethod
    def transfer(self, src: int, dst: int) -> None:
        """Move a tape between two slots (storage or import/export)."""

    def close(self) -> None:
        """Release the device."""
