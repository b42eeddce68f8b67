"""SCSI commands from Python through the ``SG_IO`` ioctl (``ctypes`` + ``fcntl.ioctl``),
the approach of PBS's ``pbs-tape``: a media changer (SMC) and a tape drive (SSC) with no
helper programs, and the sense data decoded into our errors.

Only what vmdr needs: MODE SENSE (element address assignment, write protect), READ
ELEMENT STATUS per element type (tgt's "all types" reply is malformed, and asking per type
is what mtx does too), MOVE MEDIUM, TEST UNIT READY, REWIND, SPACE, WRITE FILEMARKS,
LOAD/UNLOAD and READ(6)/WRITE(6) in variable-block mode. The file counter is ours (READ
POSITION is never trusted); backwards is rewind + forward space.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from dataclasses import dataclass

from vmdr.errors import MediaRefused, NoSpace, SlotEmpty, TapeError
from vmdr.tape.drive import Block, Changer, ChangerStatus, DriveStatus, Element, TapeDrive

SG_IO = 0x2285
SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV = -1, -2, -3
SENSE_LEN = 64
KEYS = {0: "NO SENSE", 1: "RECOVERED ERROR", 2: "NOT READY", 3: "MEDIUM ERROR",
        4: "HARDWARE ERROR", 5: "ILLEGAL REQUEST", 6: "UNIT ATTENTION", 7: "DATA PROTECT",
        8: "BLANK CHECK", 0xB: "ABORTED COMMAND", 0xD: "VOLUME OVERFLOW"}


class SgIoHdr(ctypes.Structure):
    _fields_ = [
        ("interface_id", ctypes.c_int), ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte), ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort), ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p), ("cmdp", ctypes.c_void_p), ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint), ("flags", ctypes.c_uint), ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p), ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte), ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte), ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort), ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint), ("info", ctypes.c_uint),
    ]


@dataclass(frozen=True)
class Sense:
    """Decoded fixed or descriptor format sense data."""

    key: int
    asc: int
    ascq: int
    filemark: bool = False
    eom: bool = False
    ili: bool = False
    info: int | None = None  # the information field (signed), when valid

    @property
    def text(self) -> str:
        return (f"{KEYS.get(self.key, f'sense key {self.key:#x}')} "
                f"(ASC {self.asc:#04x}, ASCQ {self.ascq:#04x})")


def decode_sense(sb: bytes) -> Sense | None:
    """Fixed (0x70/0x71) or descriptor (0x72/0x73) sense data; None when empty."""
    if not sb:
        return None
    code = sb[0] & 0x7F
    if code in (0x70, 0x71) and len(sb) >= 14:
        valid = bool(sb[0] & 0x80)
        info = struct.unpack(">i", sb[3:7])[0] if valid else None
        return Sense(sb[2] & 0x0F, sb[12], sb[13], bool(sb[2] & 0x80), bool(sb[2] & 0x40),
                     bool(sb[2] & 0x20), info)
    if code in (0x72, 0x73) and len(sb) >= 8:
        key, asc, ascq = sb[1] & 0x0F, sb[2], sb[3]
        dinfo: int | None = None
        fm = eom = ili = False
        pos, end = 8, 8 + sb[7]
        while pos + 2 <= min(end, len(sb)):
            dtype, dlen = sb[pos], sb[pos + 1]
            body = sb[pos + 2:pos + 2 + dlen]
            if dtype == 0x00 and len(body) >= 10:  # information
                dinfo = struct.unpack(">q", body[2:10])[0]
            elif dtype == 0x04 and len(body) >= 2:  # stream commands
                fm, eom, ili = bool(body[1] & 0x80), bool(body[1] & 0x40), bool(body[1] & 0x20)
            pos += 2 + dlen
        return Sense(key, asc, ascq, fm, eom, ili, dinfo)
    return Sense(0, 0, 0)


class SgDevice:
    """One SCSI device node, with ``command()`` returning (data, sense)."""

    def __init__(self, path: str, timeout_ms: int = 600_000) -> None:
        self.path = path
        self.timeout_ms = timeout_ms
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise TapeError(f"{path}: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def command(self, cdb: bytes, data_in: int = 0, data_out: Block | None = None
                ) -> tuple[bytes, Sense | None, int]:
        """Run *cdb*; return (data read, sense or None, residual). Raises ``TapeError``
        only for transport failures: a CHECK CONDITION comes back as its sense."""
        cmd = ctypes.create_string_buffer(cdb, len(cdb))
        sense = ctypes.create_string_buffer(SENSE_LEN)
        buf: ctypes.Array[ctypes.c_char]
        if isinstance(data_out, bytearray):  # the writer's block, not copied again
            buf = (ctypes.c_char * len(data_out)).from_buffer(data_out)
            direction, length = SG_DXFER_TO_DEV, len(data_out)
        elif data_out is not None:
            buf = ctypes.create_string_buffer(bytes(data_out), len(data_out))
            direction, length = SG_DXFER_TO_DEV, len(data_out)
        elif data_in:
            buf = ctypes.create_string_buffer(data_in)
            direction, length = SG_DXFER_FROM_DEV, data_in
        else:
            buf = ctypes.create_string_buffer(1)
            direction, length = SG_DXFER_NONE, 0
        hdr = SgIoHdr(interface_id=ord("S"), dxfer_direction=direction, cmd_len=len(cdb),
                      mx_sb_len=SENSE_LEN, dxfer_len=length,
                      dxferp=ctypes.cast(buf, ctypes.c_void_p),
                      cmdp=ctypes.cast(cmd, ctypes.c_void_p),
                      sbp=ctypes.cast(sense, ctypes.c_void_p), timeout=self.timeout_ms)
        try:
            fcntl.ioctl(self.fd, SG_IO, hdr)  # type: ignore[call-overload]
        except OSError as exc:
            raise TapeError(f"{self.path}: SG_IO failed: {exc.strerror}") from None
        if hdr.host_status or (hdr.driver_status & 0x0F and not hdr.sb_len_wr):
            raise TapeError(f"{self.path}: SCSI transport error (host {hdr.host_status}, "
                            f"driver {hdr.driver_status})")
        sd = decode_sense(sense.raw[:hdr.sb_len_wr]) if hdr.status == 2 else None
        got = max(0, length - hdr.resid) if direction == SG_DXFER_FROM_DEV else 0
        return buf.raw[:got], sd, hdr.resid

    def check(self, cdb: bytes, data_in: int = 0, data_out: Block | None = None,
              what: str = "command") -> bytes:
        data, sense, _ = self.command(cdb, data_in, data_out)
        if sense is not None and sense.key not in (0, 1):
            raise _error(self.path, what, sense)
        return data


def _error(path: str, what: str, s: Sense) -> TapeError | NoSpace:
    msg = f"{path}: {what}: {s.text}"
    if s.key == 7:
        return MediaRefused(f"{path}: the tape is write-protected ({s.text})")
    if s.key == 0xD:
        return NoSpace(f"{path}: end of medium ({s.text})")
    if s.key == 5 and s.asc == 0x3B and s.ascq in (0x0E, 0x0D):  # source empty / dest full
        return SlotEmpty(msg) if s.ascq == 0x0E else TapeError(msg)
    return TapeError(msg)


# ------------------------------------------------------------------ the changer (SMC)
ELEM_TRANSPORT, ELEM_STORAGE, ELEM_IE, ELEM_DRIVE = 1, 2, 3, 4


def parse_element_status(data: bytes, etype: int) -> list[tuple[int, bool, str | None,
                                                                  int | None]]:
    """READ ELEMENT STATUS reply → [(address, full, volume tag, source address)]. Reads
    only the descriptors actually present (tgt's reply is 8 bytes short)."""
    out: list[tuple[int, bool, str | None, int | None]] = []
    if len(data) < 8:
        return out
    pos = 8
    while pos + 8 <= len(data):
        ptype, flags = data[pos], data[pos + 1]
        dlen = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        nbytes = int.from_bytes(data[pos + 5:pos + 8], "big")
        pos += 8
        end = min(pos + nbytes, len(data))
        while dlen and pos + min(dlen, 12) <= end:
            d = data[pos:pos + dlen]
            addr = struct.unpack(">H", d[0:2])[0]
            full = bool(d[2] & 0x01)
            src = struct.unpack(">H", d[10:12])[0] if len(d) >= 12 and d[9] & 0x80 else None
            tag = None
            if flags & 0x80 and len(d) > 12:  # tgt's reply can cut the 36-byte tag short
                tag = d[12:48].decode("ascii", "replace").strip(" \x00") or None
            if (ptype & 0x0F) == etype:
                out.append((addr, full, tag, src))
            pos += dlen
        pos = end
    return out


class SgChanger(Changer):
    def __init__(self, path: str) -> None:
        self.dev = SgDevice(path)
        self._map: dict[int, tuple[int, int]] | None = None  # etype -> (first, count)

    def close(self) -> None:
        self.dev.close()

    def _addresses(self) -> dict[int, tuple[int, int]]:
        if self._map is None:
            # MODE SENSE(6), DBD, page 0x1D: element address assignment
            data = self.dev.check(bytes([0x1A, 0x08, 0x1D, 0, 255, 0]), 255, what="MODE SENSE")
            p = data[4 + data[3]:]
            if len(p) < 20 or (p[0] & 0x3F) != 0x1D:
                raise TapeError(f"{self.dev.path}: no element address assignment page")
            u = struct.unpack(">8H", p[2:18])
            self._map = {ELEM_TRANSPORT: (u[0], u[1]), ELEM_STORAGE: (u[2], u[3]),
                         ELEM_IE: (u[4], u[5]), ELEM_DRIVE: (u[6], u[7])}
        return self._map

    def _elements(self, etype: int) -> list[tuple[int, bool, str | None, int | None]]:
        first, count = self._addresses()[etype]
        if not count:
            return []
        alloc = 8 + 8 + count * 52 + 64
        cdb = struct.pack(">BBHHBBBBBB", 0xB8, 0x10 | etype, first, count, 0,
                          (alloc >> 16) & 0xFF, (alloc >> 8) & 0xFF, alloc & 0xFF, 0, 0)
        return parse_element_status(self.dev.check(cdb, alloc, what="READ ELEMENT STATUS"),
                                    etype)

    def _numbering(self) -> tuple[dict[int, int], dict[int, int]]:
        """addresses → mtx-style numbers: slots 1.. then ie; drives 0.."""
        amap = self._addresses()
        slot_no: dict[int, int] = {}
        n = 1
        for etype in (ELEM_STORAGE, ELEM_IE):
            first, count = amap[etype]
            for a in range(first, first + count):
                slot_no[a] = n
                n += 1
        first, count = amap[ELEM_DRIVE]
        return slot_no, {a: i for i, a in enumerate(range(first, first + count))}

    def status(self) -> ChangerStatus:
        slot_no, drive_no = self._numbering()
        drives = [Element("drive", drive_no.get(a, 0), full, tag if full else None,
                          slot_no.get(src) if src is not None else None)
                  for a, full, tag, src in self._elements(ELEM_DRIVE)]
        slots = [Element(kind, slot_no.get(a, 0), full, tag if full else None)
                 for etype, kind in ((ELEM_STORAGE, "slot"), (ELEM_IE, "ie"))
                 for a, full, tag, _ in self._elements(etype)]
        return ChangerStatus(drives, slots)

    def _address(self, number: int, drive: bool = False) -> int:
        slot_no, drive_no = self._numbering()
        table = drive_no if drive else slot_no
        for a, n in table.items():
            if n == number:
                return a
        raise SlotEmpty(f"the changer has no {'drive' if drive else 'slot'} {number}")

    def _move(self, src: int, dst: int) -> None:
        transport = self._addresses()[ELEM_TRANSPORT][0]
        cdb = struct.pack(">BBHHHHBB", 0xA5, 0, transport, src, dst, 0, 0, 0)
        self.dev.check(cdb, what="MOVE MEDIUM")

    def load(self, slot: int, drive: int = 0) -> None:
        st = self.status()
        el = st.slot(slot)
        if el is None or not el.full:
            raise SlotEmpty(f"slot {slot} is empty")
        self._move(self._address(slot), self._address(drive, drive=True))

    def unload(self, slot: int | None = None, drive: int = 0) -> None:
        st = self.status()
        d = next((e for e in st.drives if e.number == drive), None)
        if d is None or not d.full:
            raise SlotEmpty(f"drive {drive} is empty")
        dst = slot if slot is not None else d.source
        if dst is None:
            raise TapeError("the drive does not know where its tape came from: give a slot")
        self._move(self._address(drive, drive=True), self._address(dst))

    def transfer(self, src: int, dst: int) -> None:
        self._move(self._address(src), self._address(dst))


# ------------------------------------------------------------------ the drive (SSC)
class SgDrive(TapeDrive):
    def __init__(self, path: str) -> None:
        self.dev = SgDevice(path)
        self._file = 0
        self._eom = False

    def close(self) -> None:
        self.dev.close()

    def status(self) -> DriveStatus:
        _, sense, _ = self.dev.command(bytes(6))  # TEST UNIT READY
        if sense is not None and sense.key == 2:
            loaded = sense.asc != 58  # 3A: medium not present
            return DriveStatus(loaded, False, file_number=self._file)
        wp = False
        data, s2, _ = self.dev.command(bytes([0x1A, 0x08, 0x3F, 0, 255, 0]), 255)  # MODE SENSE
        if s2 is None and len(data) >= 3:
            wp = bool(data[2] & 0x80)
        cln = sense is not None and sense.asc == 0x30 and sense.ascq == 0x03
        return DriveStatus(True, True, wp, self._eom, cln, self._file)

    def rewind(self) -> None:
        self.dev.check(bytes([0x01, 0, 0, 0, 0, 0]), what="REWIND")
        self._file, self._eom = 0, False

    def _space(self, code: int, count: int) -> Sense | None:
        n = count & 0xFFFFFF
        _, sense, _ = self.dev.command(bytes([0x11, code, n >> 16 & 0xFF, n >> 8 & 0xFF,
                                              n & 0xFF, 0]))
        return sense

    @staticmethod
    def _short(sense: Sense | None) -> bool:
        """A SPACE that did not complete: any CHECK CONDITION but a recovered error (tgt
        reports the end of data as NO SENSE + "end-of-data detected", not BLANK CHECK)."""
        return sense is not None and sense.key != 1

    def forward_space_files(self, count: int) -> None:
        if count <= 0:
            return
        sense = self._space(1, count)
        if self._short(sense):
            assert sense is not None
            done = count - sense.info if sense.info is not None else 0
            self._file += max(0, done)
            raise TapeError(f"end of data while spacing {count} files ({sense.text})")
        self._file += count

    def move_to_eod(self) -> int:
        self.rewind()
        while True:
            if self._short(self._space(1, 1)):
                break
            self._file += 1
        self.locate_file(self._file)
        return self._file

    def position(self) -> int:
        return self._file

    def read_block(self) -> bytes | None:
        n = self.block_size
        cdb = bytes([0x08, 0x02, n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, 0])  # SILI, variable
        data, sense, _resid = self.dev.command(cdb, n)
        if sense is None:
            return data
        if sense.filemark:
            self._file += 1
            return None
        if sense.key == 8:
            raise TapeError(f"{self.dev.path}: end of data ({sense.text})")
        if sense.ili and sense.info is not None and sense.info > 0:
            # a short block: the information field is the residual (tgt's resid is not)
            got = n - sense.info
            return data[:got] if len(data) >= got else data
        if sense.key in (0, 1):
            return data
        raise _error(self.dev.path, "READ", sense)

    def write_block(self, data: Block) -> bool:
        n = len(data)
        cdb = bytes([0x0A, 0x00, n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, 0])
        _, sense, _ = self.dev.command(cdb, data_out=data)
        if sense is not None:
            if sense.eom and sense.key in (0, 1):
                self._eom = True  # early warning; the block was written
            else:
                raise _error(self.dev.path, "WRITE", sense)
        return self._eom

    def write_filemark(self) -> None:
        self.dev.check(bytes([0x10, 0, 0, 0, 1, 0]), what="WRITE FILEMARKS")
        self._file += 1

    def unload(self) -> None:
        self.dev.check(bytes([0x1B, 0, 0, 0, 0, 0]), what="UNLOAD")
        self._file = 0
