"""Keys, object IDs and the stored-object codec (docs/format.md §3–§5)."""

from __future__ import annotations

import base64
import os
import struct
import threading
from dataclasses import dataclass

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmdr.errors import IntegrityError, UnsupportedFormat

OBJECT_VERSION = 1
TYPE_CHUNK, TYPE_SNAPSHOT, TYPE_ATTACHMENT = 1, 2, 3
COMP_NONE, COMP_ZSTD = 0, 1
CIPHER_NONE, CIPHER_AESGCM = 0, 1
HEADER = struct.Struct("<BBBB")
NONCE_LEN = 12
TAG_LEN = 16
HOLE = bytes(32)
MIN_SAVING = 0.97  # store uncompressed unless zstd saves at least 3 %

_CTX_ID = "vmdr 2026-11 chunk id"
_CTX_ENC = "vmdr 2026-11 object encryption"
_CTX_MAC = "vmdr 2026-11 config mac"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True)
class MasterKey:
    """The 64-byte repository master key and its derived subkeys."""

    raw: bytes

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(64))

    def _derive(self, ctx: str) -> bytes:
        return blake3.blake3(self.raw, derive_key_context=ctx).digest()

    @property
    def id_key(self) -> bytes:
        return self._derive(_CTX_ID)

    @property
    def enc_key(self) -> bytes:
        return self._derive(_CTX_ENC)

    @property
    def mac_key(self) -> bytes:
        return self._derive(_CTX_MAC)


class ObjectCodec:
    """Turns plaintext into stored objects and back, for one repository.

    Thread-safe: zstd contexts are per thread; AESGCM and BLAKE3 release the GIL, so a
    pool of threads uses every core.
    """

    def __init__(self, key: MasterKey | None, level: int = 3) -> None:
        self.encrypted = key is not None
        self._id_key = key.id_key if key else None
        self._aead = AESGCM(key.enc_key) if key else None
        self.level = level
        self._local = threading.local()

    def object_id(self, data: bytes | memoryview) -> bytes:
        if self._id_key is None:
            return blake3.blake3(data).digest()
        return blake3.blake3(data, key=self._id_key).digest()

    def _zc(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "zc", None)
        if c is None:
            c = self._local.zc = zstandard.ZstdCompressor(level=self.level)
        return c

    def _zd(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "zd", None)
        if d is None:
            d = self._local.zd = zstandard.ZstdDecompressor()
        return d

    def pack(
        self, otype: int, oid: bytes, data: bytes | memoryview, compress: bool = True
    ) -> bytes:
        """Encode plaintext *data* (whose ID is *oid*) as a stored object."""
        comp = COMP_NONE
        payload: bytes | memoryview = data
        if compress and self.level > 0 and len(data) > 64:
            z = self._zc().compress(data)
            if len(z) < len(data) * MIN_SAVING:
                comp, payload = COMP_ZSTD, z
        if self._aead is None:
            return HEADER.pack(OBJECT_VERSION, otype, comp, CIPHER_NONE) + bytes(payload)
        header = HEADER.pack(OBJECT_VERSION, otype, comp, CIPHER_AESGCM)
        nonce = os.urandom(NONCE_LEN)
        return header + nonce + self._aead.encrypt(nonce, bytes(payload), header + oid)

    def _check(self, otype: int, oid: bytes, blob: bytes, what: str) -> tuple[int, int]:
        """Check a stored object's header; return its ``(compression, cipher)``."""
        if len(blob) < HEADER.size:
            raise IntegrityError(f"{what} {oid.hex()[:16]} is truncated")
        version, got_type, comp, cipher = HEADER.unpack_from(blob)
        if version != OBJECT_VERSION:
            raise UnsupportedFormat(
                f"{what} {oid.hex()[:16]} has object format version {version}; "
                f"this vmdr reads version {OBJECT_VERSION}"
            )
        if got_type != otype:
            raise IntegrityError(f"{what} {oid.hex()[:16]} has the wrong object type")
        if self._aead is not None and cipher != CIPHER_AESGCM:
            raise IntegrityError(f"{what} {oid.hex()[:16]} is not encrypted")
        if self._aead is None and cipher != CIPHER_NONE:
            raise IntegrityError(f"{what} {oid.hex()[:16]} is encrypted but no key is set")
        return comp, cipher

    @staticmethod
    def _known(comp: int, oid: bytes, what: str) -> None:
        if comp not in (COMP_NONE, COMP_ZSTD):  # checked after the MAC, as the header is
            raise IntegrityError(f"{what} {oid.hex()[:16]} has unknown compression {comp}")

    def _decrypt_into(self, oid: bytes, blob: bytes, out: memoryview, what: str) -> None:
        """Authenticate and decrypt *blob*'s payload into *out* (exactly its length)."""
        assert self._aead is not None
        view = memoryview(blob)
        try:
            self._aead.decrypt_into(view[HEADER.size : HEADER.size + NONCE_LEN],
                                    view[HEADER.size + NONCE_LEN :],
                                    blob[: HEADER.size] + oid, out)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"{what} {oid.hex()[:16]} failed authentication (corrupt or tampered)"
            ) from None

    def unpack_into(self, otype: int, oid: bytes, blob: bytes, out: memoryview,
                    what: str = "object") -> None:
        """Decode a stored object straight into *out*, which must be exactly as long as
        its plaintext; raise ``IntegrityError`` (wrong length, failed MAC, bad ID) else.

        The restore path: no per-object buffers. The ciphertext's tag is checked before
        the (compressed) payload is decompressed, and the plaintext's BLAKE3 ID after;
        on any error *out* holds garbage and must not be used."""
        comp, _ = self._check(otype, oid, blob, what)
        short = f"{what} {oid.hex()[:16]} has the wrong length"
        payload: memoryview
        if self._aead is not None:
            plen = len(blob) - HEADER.size - NONCE_LEN - TAG_LEN
            if plen < 0:
                raise IntegrityError(f"{what} {oid.hex()[:16]} is truncated")
            if comp == COMP_NONE:
                if plen != len(out):
                    raise IntegrityError(short)
                self._decrypt_into(oid, blob, out, what)
            else:
                payload = self._scratch(plen)
                self._decrypt_into(oid, blob, payload, what)
        else:
            payload = memoryview(blob)[HEADER.size :]
            if comp == COMP_NONE:
                if len(payload) != len(out):
                    raise IntegrityError(short)
                out[:] = payload
        self._known(comp, oid, what)
        if comp == COMP_ZSTD:
            try:
                reader = self._zd().stream_reader(payload, read_size=max(1, len(payload)))
                filled = 0
                while filled < len(out):
                    n = reader.readinto(out[filled:])
                    if not n:
                        break
                    filled += n
                if filled != len(out) or reader.read(1):
                    raise IntegrityError(short)
            except zstandard.ZstdError:
                raise IntegrityError(f"{what} {oid.hex()[:16]} does not decompress") from None
        if self.object_id(out) != oid:
            raise IntegrityError(f"{what} {oid.hex()[:16]} does not match its ID (corrupt)")

    def _scratch(self, n: int) -> memoryview:
        """A per-thread buffer of *n* bytes for compressed plaintext (reused)."""
        buf: bytearray | None = getattr(self._local, "scratch", None)
        if buf is None or len(buf) < n:
            buf = self._local.scratch = bytearray(max(n, 1 << 20))
        return memoryview(buf)[:n]

    def unpack(self, otype: int, oid: bytes, blob: bytes, what: str = "object") -> bytes:
        """Decode a stored object, checking everything; never return unverified bytes."""
        comp, _ = self._check(otype, oid, blob, what)
        payload: bytes | memoryview
        if self._aead is not None:
            view = memoryview(blob)  # no slice copies of a 4 MiB object
            try:
                payload = self._aead.decrypt(
                    view[HEADER.size : HEADER.size + NONCE_LEN], view[HEADER.size + NONCE_LEN :],
                    blob[: HEADER.size] + oid,
                )
            except (InvalidTag, ValueError):
                raise IntegrityError(
                    f"{what} {oid.hex()[:16]} failed authentication (corrupt or tampered)"
                ) from None
        else:
            payload = memoryview(blob)[HEADER.size :]
        self._known(comp, oid, what)
        if comp == COMP_ZSTD:
            try:
                data = self._zd().decompress(payload)
            except zstandard.ZstdError:
                raise IntegrityError(f"{what} {oid.hex()[:16]} does not decompress") from None
        else:
            data = bytes(payload)
        if self.object_id(data) != oid:
            raise IntegrityError(f"{what} {oid.hex()[:16]} does not match its ID (corrupt)")
        return data
