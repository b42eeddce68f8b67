"""Durations, sizes and throughputs as written in the inventory, and their display."""

from __future__ import annotations

import re

_DUR = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DUR_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)\s*$", re.IGNORECASE)
_SIZE_MUL = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_duration(text: str) -> float | None:
    """``90s``, ``30m``, ``4h``, ``1d12h``, ``2w`` → seconds; None when invalid."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DUR.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DUR_S[m.group(2)]
        pos = m.end()
    return total if text and pos == len(text) else None


def parse_size(text: str) -> int | None:
    """``64GiB``, ``512M``, ``2TB`` (binary multiples) → bytes; None when invalid."""
    m = _SIZE.match(text)
    if not m:
        return None
    unit = m.group(2).upper()
    return int(float(m.group(1)) * _SIZE_MUL["" if unit == "B" else unit[0]])


def parse_rate(text: str) -> float | None:
    """``200MiB/s`` → bytes per second; None when invalid."""
    if not text.endswith("/s"):
        return None
    size = parse_size(text[:-2])
    return float(size) if size else None


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 3 * 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def fmt_size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
