"""On-tape formats (docs/format.md §tape): every vmdr tape file is one *archive*.

An archive is a byte stream cut into fixed ``BLOCK_SIZE`` blocks, the last one padded
with zeros after the END frame::

    "VMDRTAPE"  u16 version=1  u8 kind  u8 0          (12 bytes, once)
    frame*                                             (the first is the HEADER frame)

    frame = u8 type | u8 flags | u32 length | 32-byte id | payload | 32-byte mac

    mac   = BLAKE3-keyed(tape MAC key, file uuid ‖ u64 index ‖ type ‖ id ‖ payload)

Kinds: 1 label, 2 media-set label, 3 chunk archive, 4 snapshot archive, 5 catalog.
Frame types: ``HEADER`` (JSON: file uuid, kind, media set, tape, sequence…), ``CHUNK``
and ``SNAPSHOT`` (the repository's stored object, already encrypted and authenticated,
byte for byte; id = its object ID), ``DOC`` (a JSON document: repository config, key
slots, a catalog), ``END`` (payload: u64 frame count, so a truncated file is detected).

The tape MAC key is derived from the repository master key (the exported key file opens
it); for an unencrypted repository and for the label file, which is written before a tape
belongs to any repository, the MAC is plain BLAKE3 (corruption, not tampering). Every
frame is checked before its content is used. With a pool key, each payload is also sealed
with AES-256-GCM (the header frame stays readable).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmdr.errors import IntegrityError, LabelUnreadable, UnsupportedFormat
from vmdr.tape.drive import TapeDrive

MAGIC = b"VMDRTAPE"
VERSION = 1
PREFIX = struct.Struct("<8sHBB")
FRAME = struct.Struct("<BBI32s")
MAC_LEN = 32
KIND_LABEL, KIND_SET, KIND_CHUNKS, KIND_SNAPSHOTS, KIND_CATALOG = 1, 2, 3, 4, 5
KIND_NAMES = {KIND_LABEL: "label", KIND_SET: "media-set label", KIND_CHUNKS: "chunk archive",
              KIND_SNAPSHOTS: "snapshot archive", KIND_CATALOG: "catalog"}
T_HEADER, T_CHUNK, T_SNAPSHOT, T_DOC, T_END = 0x10, 0x01, 0x02, 0x03, 0xFF
F_SEALED = 0x01
_CTX_TAPE = "vmdr 2026-12 tape mac"
NO_ID = bytes(32)


def tape_mac_key(master_raw: bytes | None) -> bytes | None:
    """The tape MAC key of a repository master key (None: unkeyed BLAKE3)."""
    if master_raw is None:
        return None
    return blake3.blake3(master_raw, derive_key_context=_CTX_TAPE).digest()


def pool_key(secret: bytes) -> bytes:
    """The AES key sealing a pool's payloads, from the pool key file's bytes."""
    return blake3.blake3(secret, derive_key_context="vmdr 2026-12 tape pool key").digest()


def _mac(key: bytes | None, file_uuid: bytes, index: int, ftype: int, oid: bytes,
         payload: bytes | memoryview) -> bytes:

    h = blake3.blake3(key=key) if key else blake3.blake3()
    h.update(file_uuid + struct.pack("<QB", index, ftype) + oid)
    h.update(payload)
    return h.digest()


@dataclass
class Frame:
    type: int
    id: bytes
    payload: bytes

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.payload)
        return doc


class ArchiveWriter:
    """Write one archive through *drive*; ``finish()`` ends it with END and a filemark.

    Frames are not copied here: a block is a list of pieces (memoryviews of the frame
    header, of the stored object's bytes as the repository returned them, of the MAC)
    handed to ``drive.write_gathered``. The virtual drive passes them to ``writev``;
    a real drive's back end joins them into its one SCSI buffer — in the drive thread
    when a ``WriteBehind`` sits in front. The pieces are immutable, so a block may still
    be in the queue while the next one forms.

    ``eom`` turns true when the drive reports the end-of-medium early warning; the caller
    then stops adding payload frames and finishes the file (the warning zone leaves room
    for the END frame and the tape's catalog)."""

    def __init__(self, drive: TapeDrive, kind: int, header: dict[str, Any],
                 mac_key: bytes | None, seal_key: bytes | None = None) -> None:
        self.drive = drive
        self.kind = kind
        self.mac_key = mac_key
        self._aead = AESGCM(seal_key) if seal_key else None
        self.file_uuid = uuid.uuid4().bytes
        self.header = {**header, "file_uuid": self.file_uuid.hex(), "kind": kind,
                       "sealed": seal_key is not None}
        self._bs = drive.block_size
        self._segs: list[memoryview] = []
        self._fill = 0
        self._index = 0
        self.eom = False
        self.bytes = 0  # bytes handed to the drive (whole blocks)
        self.ids: list[bytes] = []
        self._put(PREFIX.pack(MAGIC, VERSION, kind, 0))
        self._add(T_HEADER, NO_ID, json.dumps(self.header, sort_keys=True).encode(), NO_ID)

    def _put(self, data: bytes) -> None:
        mv = memoryview(data)
        bs = self._bs
        while mv:
            n = min(bs - self._fill, len(mv))
            self._segs.append(mv[:n])
            self._fill += n
            mv = mv[n:]
            if self._fill == bs:
                self._emit()

    def _emit(self) -> None:
        if self._fill < self._bs:
            self._segs.append(memoryview(bytes(self._bs - self._fill)))  # zero padding
        segs, self._segs, self._fill = self._segs, [], 0
        self.bytes += self._bs
        if self.drive.write_gathered([segs]):
            self.eom = True

    def _add(self, ftype: int, oid: bytes, payload: bytes, mac_uuid: bytes) -> None:
        flags = 0
        if self._aead is not None and ftype not in (T_HEADER, T_END):
            nonce = os.urandom(12)
            payload = nonce + self._aead.encrypt(nonce, payload, self.file_uuid + oid)
            flags = F_SEALED
        mac = _mac(self.mac_key, mac_uuid, self._index, ftype, oid, payload)
        self._put(FRAME.pack(ftype, flags, len(payload), oid))
        self._put(payload)
        self._put(mac)
        self._index += 1

    def add(self, ftype: int, oid: bytes, payload: bytes) -> None:
        self._add(ftype, oid, payload, self.file_uuid)
        if ftype in (T_CHUNK, T_SNAPSHOT):
            self.ids.append(oid)

    def add_doc(self, doc: dict[str, Any]) -> None:
        self.add(T_DOC, NO_ID, json.dumps(doc, sort_keys=True).encode())

    def finish(self) -> None:
        """END, zero padding to a whole block (every block vmdr writes is full size:
        tgt, for one, garbles short blocks of more than half the read size), filemark."""
        self._add(T_END, NO_ID, struct.pack("<Q", self._index + 1), self.file_uuid)
        if self._fill:
            self._emit()
        self.drive.write_filemark()


class _BlockStream:
    """Bytes of the current tape file, read block by block."""

    def __init__(self, drive: TapeDrive) -> None:
        self.drive = drive
        self.buf = bytearray()
        self.eof = False

    def need(self, n: int) -> bytes:
        while len(self.buf) < n and not self.eof:
            b = self.drive.read_block()
            if b is None:
                self.eof = True
            else:
                self.buf += b
        if len(self.buf) < n:
            raise IntegrityError("tape file ends in the middle of a frame (truncated)")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def skip_rest(self) -> None:
        while not self.eof:
            if self.drive.read_block() is None:
                self.eof = True


class ArchiveReader:
    """Read the archive at the head: ``header`` at once, then ``frames()``; every frame's
    MAC is checked before it is returned, and END's count before the iteration stops."""

    def __init__(self, drive: TapeDrive, mac_key: bytes | None,
                 seal_key: bytes | None = None,
                 unreadable: Callable[[str], Exception] = IntegrityError) -> None:
        self.mac_key = mac_key
        self._aead = AESGCM(seal_key) if seal_key else None
        self._s = _BlockStream(drive)
        self._index = 0
        try:
            prefix = self._s.need(PREFIX.size)
        except IntegrityError:
            raise unreadable("the tape file is empty or too short to be a vmdr archive") \
                from None
        magic, version, kind, _ = PREFIX.unpack(prefix)
        if magic != MAGIC:
            self._s.skip_rest()
            raise unreadable("not a vmdr tape file (no VMDRTAPE magic)")
        if version != VERSION:
            self._s.skip_rest()
            raise UnsupportedFormat(f"tape archive format version {version}; this vmdr "
                                    f"reads version {VERSION}")
        self.kind = kind
        try:
            hdr = self._frame(NO_ID)
        except IntegrityError as exc:
            self._s.skip_rest()
            raise unreadable(f"the tape file's header {exc}") from None
        if hdr.type != T_HEADER:
            raise unreadable("the tape file has no header frame")
        self.header: dict[str, Any] = hdr.json()
        self.file_uuid = bytes.fromhex(str(self.header.get("file_uuid", "")))
        if self.header.get("sealed") and self._aead is None:
            self._s.skip_rest()
            raise LabelUnreadable("this tape file is sealed with a pool key: give the "
                                  "pool's key file")

    def _frame(self, mac_uuid: bytes) -> Frame:
        ftype, flags, length, oid = FRAME.unpack(self._s.need(FRAME.size))
        payload = self._s.need(length)
        mac = self._s.need(MAC_LEN)
        if _mac(self.mac_key, mac_uuid, self._index, ftype, oid, payload) != mac:
            raise IntegrityError(
                f"failed its MAC check (frame {self._index}): wrong or missing key — give "
                "the repository's exported key file with --key-file — or corrupt data")
        self._index += 1
        if flags & F_SEALED:
            if self._aead is None:
                raise IntegrityError("sealed frame without a pool key")
            try:
                payload = self._aead.decrypt(payload[:12], payload[12:], self.file_uuid + oid)
            except InvalidTag:
                raise IntegrityError("a sealed frame failed authentication") from None
        return Frame(ftype, oid, payload)

    def frames(self) -> Iterator[Frame]:
        """Every payload frame, checked; stops after a valid END (the head then stands at
        the start of the next file)."""
        while True:
            f = self._frame(self.file_uuid)
            if f.type == T_END:
                (count,) = struct.unpack("<Q", f.payload)
                if count != self._index:
                    raise IntegrityError("tape file's END frame count does not match")
                self._s.skip_rest()
                return
            yield f

    def docs(self) -> list[dict[str, Any]]:
        return [f.json() for f in self.frames() if f.type == T_DOC]
