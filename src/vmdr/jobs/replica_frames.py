"""The framed stream of a replica cycle over ssh: every changed piece of the standby disks
goes to the DR host as one frame on the stdin of the command serving them, compressed by
vmdr with zstd at a low level (instead of ssh's zlib, which costs ~18 ms per MiB of data
that does not compress), or raw when zstd would not make it smaller.

This module is also the helper run at the DR host (``python3 -c`` with this file's
source, system Python: the standard library, plus ``nbd`` and optionally ``zstandard``
imported only there). It reads the frames, decompresses each, writes it into the
standby disk's ``qemu-nbd`` export, and after the end frame flushes every disk and
answers ``ok FRAMES BYTES``. A truncated or corrupt stream ends it with one error line
on stderr and no ``ok``: nothing of such a cycle is acknowledged, and the cycle fails.

A frame: ``VF``, kind (1 raw, 2 zstd, 3 zeroes, 0 end), disk index (u16), offset (u64),
length of the data (u32), length of the payload that follows (u32); big-endian. Nothing
here imports vmdr.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from typing import IO, Any

HEADER = struct.Struct(">2sBHQII")
MAGIC = b"VF"
END, RAW, ZSTD, ZERO = 0, 1, 2, 3
MAX_PIECE = 64 << 20  # no frame carries more (a corrupt length is not trusted)
LEVEL = 1  # zstd level: fast, and ~as small as ssh's zlib on text and zeroes


class FrameError(Exception):
    """A truncated or corrupt frame (one line: what and where)."""


def frame(kind: int, disk: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, disk, offset, length, len(payload)) + payload


def data_frame(disk: int, offset: int, data: bytes, compress: Callable[[bytes], bytes] | None
               ) -> bytes:
    """The frame of one piece: zstd when ``compress`` is given and makes it smaller, raw
    otherwise (data that does not compress costs one fast zstd pass and no more)."""
    if compress is not None:
        z = compress(data)
        if len(z) < len(data):
            return frame(ZSTD, disk, offset, len(data), z)
    return frame(RAW, disk, offset, len(data), data)


def _exactly(stream: IO[bytes], n: int, what: str) -> bytes:
    buf = stream.read(n)
    if len(buf) != n:
        raise FrameError(f"the stream ended inside {what} ({len(buf)} of {n} bytes)")
    return buf


def apply(stream: IO[bytes], write: Callable[[int, int, bytes], None],
          zero: Callable[[int, int, int], None], disks: int,
          decompress: Callable[[bytes, int], bytes] | None) -> tuple[int, int]:
    """Apply every frame of ``stream`` up to the end frame: ``(frames, bytes written)``.
    FrameError on a truncated or corrupt frame (what was applied before it is not
    acknowledged: the caller answers ``ok`` only after a clean end)."""
    frames = total = 0
    while True:
        head = stream.read(HEADER.size)
        if not head:
            raise FrameError(f"the stream ended after {frames} frames without its end frame")
        if len(head) != HEADER.size:
            raise FrameError(f"the stream ended inside the header of frame {frames + 1}")
        magic, kind, disk, off, ln, plen = HEADER.unpack(head)
        where = f"frame {frames + 1} (disk {disk}, offset {off})"
        if magic != MAGIC:
            raise FrameError(f"corrupt {where}: bad magic")
        if kind == END:
            return frames, total
        if disk >= disks or ln > MAX_PIECE or plen > MAX_PIECE:
            raise FrameError(f"corrupt {where}: disk or length out of range")
        if kind == ZERO:
            if plen:
                raise FrameError(f"corrupt {where}: zeroes with a payload")
            zero(disk, off, ln)
        elif kind in (RAW, ZSTD):
            payload = _exactly(stream, plen, where)
            if kind == ZSTD:
                if decompress is None:
                    raise FrameError(f"{where} is zstd, and zstandard is missing here")
                try:
                    payload = decompress(payload, ln)
                except Exception as exc:  # zstandard.ZstdError and friends
                    raise FrameError(f"corrupt {where}: does not decompress ({exc})") from None
            if len(payload) != ln:
                raise FrameError(f"corrupt {where}: {len(payload)} bytes, not {ln}")
            write(disk, off, payload)
            total += ln
        else:
            raise FrameError(f"corrupt {where}: unknown kind {kind}")
        frames += 1


def decompressor() -> Callable[[bytes, int], bytes] | None:
    try:
        import zstandard
    except ImportError:
        return None
    d = zstandard.ZstdDecompressor()
    return lambda z, n: d.decompress(z, max_output_size=n)


def main(argv: list[str]) -> int:  # pragma: no cover - runs at the DR host (integration)
    """``DIR N``: write frames into the exports ``DIR/1.sock`` .. ``DIR/N.sock``."""
    out, err = sys.stdout, sys.stderr
    directory, n = argv[0], int(argv[1])
    try:
        import nbd
    except ImportError:
        out.write("forward\n")  # no libnbd for Python here: the caller forwards the sockets
        out.flush()
        sys.stdin.buffer.read()
        return 0
    handles: list[Any] = []
    try:
        for i in range(1, n + 1):
            h = nbd.NBD()
            h.connect_unix(f"{directory}/{i}.sock")
            handles.append(h)
        dec = decompressor()
        out.write("zstd\n" if dec is not None else "raw\n")
        out.flush()
        frames, total = apply(sys.stdin.buffer,
                              lambda d, o, data: handles[d].pwrite(data, o),
                              lambda d, o, ln: handles[d].zero(ln, o), n, dec)
        for h in handles:
            h.flush()
    except FrameError as exc:
        err.write(f"replica stream: {exc}\n")
        return 7
    except nbd.Error as exc:
        err.write(f"replica stream: writing the standby: {exc}\n")
        return 8
    finally:
        for h in handles:
            try:
                h.shutdown()
            except Exception:
                pass
    out.write(f"ok {frames} {total}\n")
    out.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
