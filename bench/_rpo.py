"""Pure arithmetic of the RPO benchmark (bench/replica_rpo.py): finding the newest
sequence-numbered record in a slice of a records area, percentiles of samples and of
QEMU latency histograms. No I/O here, so tests/unit/test_bench_rpo.py can check it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from tests.guest import layout as L
from tests.guest.records import parse_record

# QEMU block-latency histogram boundaries (ns): geometric, 20 us .. ~30 s, ratio 1.12, so
# a bin's geometric middle is within 6 % of every latency in it
HIST_RATIO = 1.12
HIST_BOUNDARIES = [round(20_000 * HIST_RATIO ** i) for i in range(126)]


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least ``q`` of the samples at
    or below it (p95 of 100 samples = the 95th smallest)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summary(xs: Sequence[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "median_s": None, "p95_s": None, "max_s": None}
    return {"n": len(xs), "median_s": statistics.median(xs), "p95_s": pct(xs, 0.95),
            "max_s": max(xs)}


def slot_runs(lo_seq: int, count: int, nslots: int) -> list[tuple[int, int, int]]:
    """The slots of sequence numbers ``lo_seq .. lo_seq + count - 1`` as contiguous runs
    ``(first_slot, n, first_seq)``; two runs when the range wraps past the last slot."""
    count = min(count, nslots)
    first = lo_seq % nslots
    if first + count <= nslots:
        return [(first, count, lo_seq)]
    head = nslots - first
    return [(first, head, lo_seq), (0, count - head, lo_seq + head)]


def newest_record(buf: bytes, first_slot: int, nslots: int) -> tuple[int, int] | None:
    """(seq, time_ns) of the highest valid record in ``buf`` (whole slots starting at
    ``first_slot``), or None."""
    best: tuple[int, int] | None = None
    for i in range(len(buf) // L.RECORD_SIZE):
        rec = buf[i * L.RECORD_SIZE:(i + 1) * L.RECORD_SIZE]
        seq = parse_record(rec, first_slot + i, nslots)
        if seq is not None and (best is None or seq > best[0]):
            best = (seq, L.RECORD_HEADER.unpack_from(rec)[2])
    return best


def find_newest(read: Callable[[int, int], bytes], lo_seq: int, nslots: int,
                chunk: int = 512) -> tuple[int, int] | None:
    """Newest record with seq >= ``lo_seq``: ``read(first_slot, n)`` returns ``n`` slots.
    Reads ``chunk`` slots at a time and goes on while the last slot read holds the
    expected next record (the writer got further than the window)."""
    best: tuple[int, int] | None = None
    lo = max(0, lo_seq)
    for _ in range(nslots // chunk + 1):
        top: tuple[int, int] | None = None
        for slot, n, _seq0 in slot_runs(lo, chunk, nslots):
            got = newest_record(read(slot, n), slot, nslots)
            if got is not None and got[0] >= lo and (top is None or got[0] > top[0]):
                top = got
        if top is None:
            return best
        best = top if best is None or top[0] > best[0] else best
        if top[0] < lo + chunk - 1:
            return best
        lo += chunk
    return best


def hist_pct(boundaries: Sequence[int], bins: Sequence[int], q: float) -> float | None:
    """Percentile ``q`` (ns) of a QEMU latency histogram: ``bins[i]`` counts latencies in
    [boundaries[i-1], boundaries[i]) (bin 0 below the first boundary, the last bin at or
    above the last); the answer is the geometric middle of the bin holding the
    nearest-rank sample (the first bin: its upper bound, the last: its lower bound)."""
    total = sum(bins)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for i, c in enumerate(bins):
        seen += c
        if seen >= rank:
            if i == 0:
                return float(boundaries[0])
            if i >= len(boundaries):
                return float(boundaries[-1])
            return math.sqrt(boundaries[i - 1] * boundaries[i])
    return float(boundaries[-1])


def hist_summary(h: dict[str, Any] | None) -> dict[str, Any]:
    """count, median and p95 (ms) of one QEMU histogram (``{"boundaries", "bins"}``)."""
    if not h:
        return {"count": 0, "median_ms": None, "p95_ms": None}
    b, bins = h["boundaries"], h["bins"]
    med, p95 = hist_pct(b, bins, 0.5), hist_pct(b, bins, 0.95)
    return {"count": sum(bins), "median_ms": None if med is None else med / 1e6,
            "p95_ms": None if p95 is None else p95 / 1e6}
