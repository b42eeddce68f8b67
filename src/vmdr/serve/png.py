"""PPM (what ``virDomainScreenshot`` returns from QEMU) to PNG, with zlib only."""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tokens(data: bytes, count: int) -> tuple[list[int], int]:
    """The first *count* header numbers of a binary PPM and the offset of the pixels."""
    out: list[int] = []
    pos = 2
    while len(out) < count:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise ValueError("malformed PPM header")
        out.append(int(data[start:pos]))
    return out, pos + 1  # exactly one whitespace byte before the pixels


def ppm_to_png(ppm: bytes) -> bytes:
    """Convert a binary (P6, 8-bit) PPM image to an RGB PNG."""
    if not ppm.startswith(b"P6"):
        raise ValueError("not a binary PPM (P6) image")
    (width, height, maxval), off = _tokens(ppm, 3)
    if maxval != 255 or width <= 0 or height <= 0:
        raise ValueError(f"unsupported PPM ({width}x{height}, maxval {maxval})")
    row = width * 3
    pixels = ppm[off : off + row * height]
    if len(pixels) != row * height:
        raise ValueError("truncated PPM image")
    raw = b"".join(b"\x00" + pixels[y * row : (y + 1) * row] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of a PNG."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    w, h = struct.unpack(">II", png[16:24])
    return int(w), int(h)
