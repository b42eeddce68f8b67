"""What the primitives alone allow on this machine (issue 13's "limit" column).

Measured in-process on a sample of the benchmark image's own chunks, single-threaded,
in CPU seconds (``time.thread_time``), so other jobs on a shared machine hardly move it:
zstd level 3 compression, zstd decompression, AES-256-GCM and keyed BLAKE3, each at the
rate it reaches on this data. A limit is the CPU those primitives need for a whole run
(plaintext through zstd and BLAKE3, stored bytes through AES-GCM) spread over every core:
no I/O, no interpreter, no key derivation. Nothing can go faster than that with these
algorithms; what a tool needs beyond it is its own overhead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 << 20


@dataclass
class Rates:
    """Bytes per CPU-second, per core."""

    zstd3_compress: float
    zstd_decompress: float
    aes_gcm: float
    blake3: float
    ratio: float  # stored / plain of the sample at level 3
    sample_bytes: int

    def ingest_cpu(self, plain: int, stored: int) -> float:
        return plain / self.zstd3_compress + plain / self.blake3 + stored / self.aes_gcm

    def restore_cpu(self, plain: int, stored: int) -> float:
        return plain / self.zstd_decompress + plain / self.blake3 + stored / self.aes_gcm

    def describe(self) -> str:
        gb = 1e9
        return (f"per core on a {self.sample_bytes >> 20} MiB sample of the image: zstd-3 "
                f"compression {self.zstd3_compress / gb:.2f} GB/s, zstd decompression "
                f"{self.zstd_decompress / gb:.2f} GB/s, AES-256-GCM {self.aes_gcm / gb:.2f} "
                f"GB/s, keyed BLAKE3 {self.blake3 / gb:.2f} GB/s (CPU time, one thread)")


def _sample(image: Path, chunks: int) -> list[bytes]:
    """*chunks* allocated 4 MiB chunks spread evenly over the image's data extents."""
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        starts: list[int] = []
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            starts.extend(range(data - data % CHUNK, hole, CHUNK))
            pos = hole
        starts = sorted(set(starts))
        step = max(1, len(starts) // chunks)
        return [os.pread(fd, CHUNK, off) for off in starts[::step][:chunks]]
    finally:
        os.close(fd)


def _rate(fn, items: list[bytes], weight: list[int]) -> float:  # type: ignore[no-untyped-def]
    best = 0.0
    for _ in range(2):  # the better of two passes: the first may meet a cold core/cache
        t0 = time.thread_time()
        for x in items:
            fn(x)
        dt = time.thread_time() - t0
        best = max(best, sum(weight) / max(dt, 1e-9))
    return best


def measure(image: Path, chunks: int = 32) -> Rates:
    import blake3
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = _sample(image, chunks)
    plain = [len(d) for d in data]
    zc = zstandard.ZstdCompressor(level=3)
    zd = zstandard.ZstdDecompressor()
    packed = [zc.compress(d) for d in data]
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    sealed = [aead.encrypt(nonce, p, b"aad") for p in packed]
    key = os.urandom(32)
    return Rates(
        zstd3_compress=_rate(zc.compress, data, plain),
        zstd_decompress=_rate(zd.decompress, packed, plain),
        aes_gcm=_rate(lambda c: aead.decrypt(nonce, c, b"aad"), sealed,
                      [len(p) for p in packed]),
        blake3=_rate(lambda d: blake3.blake3(d, key=key).digest(), data, plain),
        ratio=sum(len(p) for p in packed) / max(1, sum(plain)),
        sample_bytes=sum(plain),
    )
