"""Opening a library from its spec (``--library`` / ``VMDR_TAPE_LIBRARY``)::

    virtual:/var/lib/vmdr/vtl              the file-backed demo library
    mtx:/dev/sg3,/dev/nst0                 the mtx and mt programs (changer, drive)
    sg:/dev/sg3,/dev/sg4                   SCSI commands through SG_IO (changer, drive)
    mtx:,/dev/nst0  or  sg:,/dev/sg4        a stand-alone drive, no changer
"""

from __future__ import annotations

from vmdr.errors import UsageError
from vmdr.tape.drive import Changer, TapeDrive
from vmdr.tape.library import Library


def open_library(spec: str, ready_timeout: float = 120.0) -> Library:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UsageError(f"bad tape library {spec!r}: virtual:DIR, mtx:CHANGER,DRIVE or "
                         "sg:CHANGER,DRIVE")
    if kind == "virtual":
        from vmdr.tape.virtual import VirtualLibrary

        lib = VirtualLibrary(rest)
        return Library(lib.drive(), lib.changer(), ready_timeout)
    changer_dev, _, drive_dev = rest.partition(",")
    if not drive_dev:
        raise UsageError(f"bad tape library {spec!r}: give CHANGER,DRIVE device paths")
    changer: Changer | None
    drive: TapeDrive
    if kind == "mtx":
        from vmdr.tape.mtx import MtDrive, MtxChanger

        changer = MtxChanger(changer_dev) if changer_dev else None
        drive = MtDrive(drive_dev)
    elif kind == "sg":
        from vmdr.tape.sgio import SgChanger, SgDrive

        changer = SgChanger(changer_dev) if changer_dev else None
        drive = SgDrive(drive_dev)
    else:
        raise UsageError(f"unknown tape library kind {kind!r} (virtual, mtx or sg)")
    return Library(drive, changer, ready_timeout)
