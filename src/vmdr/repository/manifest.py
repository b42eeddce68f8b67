"""Snapshot manifests: a JSON header plus compact binary chunk lists (format.md §6)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import IntegrityError, UnsupportedFormat
from vmdr.repository.crypto import HOLE
from vmdr.timeutil import format_time, parse_time

MAGIC = b"VMDRSNAP"
MANIFEST_VERSION = 1
_PRE = struct.Struct("<8sBI")
ID_LEN = 32


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


class ChunkList:
    """A disk's chunk IDs, stored flat (32 bytes each) to stay compact for huge disks."""

    __slots__ = ("_buf",)

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        if len(buf) % ID_LEN:
            raise IntegrityError("chunk list length is not a multiple of 32")
        self._buf = bytearray(buf)

    @classmethod
    def holes(cls, n: int) -> ChunkList:
        return cls(bytearray(n * ID_LEN))

    def __len__(self) -> int:
        return len(self._buf) // ID_LEN

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self._buf[i * ID_LEN : (i + 1) * ID_LEN])

    def __setitem__(self, i: int, oid: bytes) -> None:
        self._buf[i * ID_LEN : (i + 1) * ID_LEN] = oid

    def __iter__(self) -> Any:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChunkList) and self._buf == other._buf

    def __hash__(self) -> int:
        return hash(bytes(self._buf))

    def resized(self, n: int) -> ChunkList:
        """A copy with *n* entries: truncated, or padded with holes."""
        buf = self._buf[: n * ID_LEN]
        buf.extend(bytes(max(0, n * ID_LEN - len(buf))))
        return ChunkList(buf)

    def tobytes(self) -> bytes:
        return bytes(self._buf)

    def ids(self) -> set[bytes]:
        """The distinct non-hole IDs."""
        return {oid for oid in self if oid != HOLE}


class UnloadedChunks(ChunkList):
    """The chunk list of a snapshot listed without its chunk lists
    (``decode(..., chunks=False)``): any use of it is a bug, and fails loudly."""

    __slots__ = ()

    def __init__(self) -> None:  # no buffer on purpose
        pass

    def _unloaded(self) -> Any:
        raise RuntimeError("chunk list not loaded: load the snapshot itself")

    __len__ = __iter__ = tobytes = ids = _unloaded  # type: ignore[assignment]

    def __getitem__(self, i: int) -> bytes:
        return self._unloaded()  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return id(self)


@dataclass
class DiskRecord:
    name: str
    size: int
    chunks: ChunkList
    format: str = "raw"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Snapshot:
    name: str
    time: datetime
    chunk_size: int
    disks: list[DiskRecord] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    host: str = ""
    parent: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    id: str = ""  # hex object ID, set once stored or loaded

    def disk(self, name: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.name == name), None)

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def summary(self) -> dict[str, Any]:
        """The JSON view used by ``vmdr snapshots --json``."""
        return {
            "id": self.id, "short_id": self.short_id, "name": self.name,
            "time": format_time(self.time), "host": self.host, "tags": list(self.tags),
            "parent": self.parent,
            "disks": [{"name": d.name, "size": d.size, "format": d.format} for d in self.disks],
            "size": sum(d.size for d in self.disks), "stats": dict(self.stats),
        }


def encode(s: Snapshot) -> bytes:
    header = {
        "name": s.name, "time": format_time(s.time), "host": s.host, "tags": s.tags,
        "chunk_size": s.chunk_size, "parent": s.parent, "meta": s.meta,
        "disks": [
            {"name": d.name, "size": d.size, "format": d.format, "chunks": len(d.chunks),
             "meta": d.meta}
            for d in s.disks
        ],
        "stats": s.stats,
    }
    for d in s.disks:
        if len(d.chunks) != chunk_count(d.size, s.chunk_size):
            raise ValueError(f"disk {d.name}: chunk list does not match its size")
    hj = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    parts = [_PRE.pack(MAGIC, MANIFEST_VERSION, len(hj)), hj]
    parts.extend(d.chunks.tobytes() for d in s.disks)
    return b"".join(parts)


def decode(data: bytes, sid: str = "", chunks: bool = True) -> Snapshot:
    """The snapshot in *data*; with ``chunks=False`` its disks' chunk lists are left
    out (:class:`UnloadedChunks`): a listing of a million-chunk repository stays small."""
    if len(data) < _PRE.size:
        raise IntegrityError(f"snapshot {sid[:8]} manifest is truncated")
    magic, version, hlen = _PRE.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(f"snapshot {sid[:8]} is not a manifest")
    if version != MANIFEST_VERSION:
        raise UnsupportedFormat(
            f"snapshot {sid[:8]} has manifest version {version}; this vmdr reads "
            f"version {MANIFEST_VERSION}"
        )
    try:
        h = json.loads(data[_PRE.size : _PRE.size + hlen])
        pos = _PRE.size + hlen
        disks = []
        for dj in h["disks"]:
            n = int(dj["chunks"])
            if n != chunk_count(int(dj["size"]), int(h["chunk_size"])):
                raise ValueError("chunk count mismatch")
            end = pos + n * ID_LEN
            if end > len(data):
                raise ValueError("short chunk list")
            disks.append(DiskRecord(
                str(dj["name"]), int(dj["size"]),
                # a view, not a slice: one copy of a chunk list (16 MB at 500k chunks)
                ChunkList(memoryview(data)[pos:end]) if chunks else UnloadedChunks(),
                str(dj.get("format", "raw")), dict(dj.get("meta") or {}),
            ))
            pos = end
        if pos != len(data):
            raise ValueError("trailing bytes")
        return Snapshot(
            name=str(h["name"]), time=parse_time(h["time"]), chunk_size=int(h["chunk_size"]),
            disks=disks, tags=list(h.get("tags") or []), host=str(h.get("host", "")),
            parent=h.get("parent"), meta=dict(h.get("meta") or {}),
            stats=dict(h.get("stats") or {}), id=sid,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"snapshot {sid[:8]} manifest is malformed ({exc})") from None
