"""Cheap, repeatable test repositories (weak KDF, temp dirs) and test images."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from vmdr.repository.keys import KdfParams
from vmdr.repository.repo import Repository
from vmdr.storage.base import Backend
from vmdr.storage.file import FileBackend

PASS = "correct horse battery staple"
SMALL_CHUNK = 64 << 10


class FakeClock:
    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def make_repo(
    path: str | Backend, encryption: str = "aes-256-gcm", chunk_size: int = SMALL_CHUNK,
    clock: FakeClock | None = None, level: int = 3,
) -> Repository:
    backend = FileBackend(path) if isinstance(path, str) else path
    kw: dict[str, Any] = {"clock": clock} if clock else {}
    return Repository.init(backend, passphrase=PASS, encryption=encryption,
                           chunk_size=chunk_size, kdf=KdfParams.for_tests(),
                           compression_level=level, **kw)


def reopen(path: str | Backend, clock: FakeClock | None = None) -> Repository:
    backend = FileBackend(path) if isinstance(path, str) else path
    kw: dict[str, Any] = {"clock": clock} if clock else {}
    return Repository.open(backend, passphrase=lambda: PASS, **kw)


def make_image(path: str, size: int, seed: int = 1, pieces: int = 12) -> bytes:
    """A sparse image with holes, random data and text; returns its full content."""
    rng = random.Random(seed)
    buf = bytearray(size)
    for _ in range(pieces):
        off = rng.randrange(0, size)
        n = min(size - off, rng.randrange(1, 300_000))
        if rng.random() < 0.5:
            piece = rng.randbytes(n)
        else:
            piece = (b"The quick brown fox %d jumps. " % rng.randrange(10**6) * (n // 30 + 1))[:n]
        buf[off : off + n] = piece
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            seg = bytes(buf[pos : pos + 65536])
            if any(seg):
                f.seek(pos)
                f.write(seg)
            pos += 65536
    os.sync()
    return bytes(buf)
