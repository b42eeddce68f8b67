"""The arithmetic of bench/replica_rpo.py (bench/_rpo.py): the newest record in a records
area, nearest-rank percentiles of RPO samples and percentiles of QEMU latency histograms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.guest.records import make_record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _rpo

NSLOTS = 64


def area(seqs: dict[int, int]) -> bytearray:
    """A records area of NSLOTS slots holding ``{seq: time_ns}``."""
    buf = bytearray(NSLOTS * 4096)
    for seq, t in seqs.items():
        slot = seq % NSLOTS
        buf[slot * 4096:(slot + 1) * 4096] = make_record(seq, NSLOTS, time_ns=t)
    return buf


def reader(buf: bytearray, calls: list[tuple[int, int]] | None = None):  # type: ignore[no-untyped-def]
    def read(first: int, n: int) -> bytes:
        assert first >= 0 and first + n <= NSLOTS
        if calls is not None:
            calls.append((first, n))
        return bytes(buf[first * 4096:(first + n) * 4096])
    return read


def test_pct_is_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]  # 1..100
    assert _rpo.pct(xs, 0.95) == 95.0
    assert _rpo.pct(xs, 0.5) == 50.0
    assert _rpo.pct([3.0, 1.0, 2.0], 0.95) == 3.0
    assert _rpo.pct([0.0] * 19 + [7.0], 0.95) == 0.0  # one outlier in 20 is above p95
    assert _rpo.pct([0.0] * 18 + [7.0, 7.0], 0.95) == 7.0


def test_summary() -> None:
    s = _rpo.summary([1.0, 2.0, 3.0, 10.0])
    assert s == {"n": 4, "median_s": 2.5, "p95_s": 10.0, "max_s": 10.0}
    assert _rpo.summary([])["p95_s"] is None


def test_slot_runs_wrap() -> None:
    assert _rpo.slot_runs(10, 5, NSLOTS) == [(10, 5, 10)]
    assert _rpo.slot_runs(60, 10, NSLOTS) == [(60, 4, 60), (0, 6, 64)]
    assert _rpo.slot_runs(64 + 3, 2, NSLOTS) == [(3, 2, 67)]


def test_find_newest_in_window_and_across_wrap() -> None:
    recs = {s: s * 50_000_000 for s in range(40, 70)}  # 40..69: slots 40..63 then 0..5
    buf = area(recs)
    got = _rpo.find_newest(reader(buf), 50, NSLOTS, chunk=8)
    assert got == (69, 69 * 50_000_000)
    # a record of an earlier lap (seq 41 in slot 41 while we look from 66) is ignored
    assert _rpo.find_newest(reader(buf), 66, NSLOTS, chunk=8) == (69, 69 * 50_000_000)
    # nothing at or above the hint
    assert _rpo.find_newest(reader(buf), 70, NSLOTS, chunk=8) is None


def test_find_newest_ignores_torn_record() -> None:
    buf = area({s: s for s in range(0, 20)})
    buf[19 * 4096 + 100] ^= 0xFF  # seq 19 torn: CRC fails
    assert _rpo.find_newest(reader(buf), 0, NSLOTS, chunk=8) == (18, 18)


def test_find_newest_reads_on_while_window_is_full() -> None:
    calls: list[tuple[int, int]] = []
    buf = area({s: s for s in range(0, 30)})
    assert _rpo.find_newest(reader(buf, calls), 0, NSLOTS, chunk=8) == (29, 29)
    assert calls == [(0, 8), (8, 8), (16, 8), (24, 8)]


def test_rpo_from_record_times() -> None:
    """RPO = newest at the source minus newest at the DR site, in the guest's clock."""
    src = area({s: s * 50_000_000 for s in range(0, 40)})
    dr = area({s: s * 50_000_000 for s in range(0, 20)})
    s = _rpo.find_newest(reader(src), 0, NSLOTS)
    d = _rpo.find_newest(reader(dr), 0, NSLOTS)
    assert s is not None and d is not None
    assert (s[1] - d[1]) / 1e9 == pytest.approx(1.0)


def test_hist_pct() -> None:
    b = [100, 200, 400, 800]
    # bins: <100, [100,200), [200,400), [400,800), >=800
    bins = [0, 10, 80, 9, 1]
    assert _rpo.hist_pct(b, bins, 0.5) == pytest.approx((200 * 400) ** 0.5)
    assert _rpo.hist_pct(b, bins, 0.95) == pytest.approx((400 * 800) ** 0.5)
    assert _rpo.hist_pct(b, bins, 1.0) == 800.0
    assert _rpo.hist_pct(b, [5, 0, 0, 0, 0], 0.5) == 100.0
    assert _rpo.hist_pct(b, [0] * 5, 0.5) is None
    s = _rpo.hist_summary({"boundaries": b, "bins": bins})
    assert s["count"] == 100 and s["median_ms"] == pytest.approx((200 * 400) ** 0.5 / 1e6)


def test_hist_boundaries_are_fine_enough() -> None:
    b = _rpo.HIST_BOUNDARIES
    assert b == sorted(set(b)) and b[0] == 20_000 and b[-1] > 20e9
    assert max(b[i + 1] / b[i] for i in range(len(b) - 1)) < 1.13


def test_reduce_counts_and_costs() -> None:
    """bench/replica_rpo.py's reduction of a raw run: RPO summaries per mode, exact-zero
    and in-step counts, latency per guest and the costs the table shows."""
    import replica_rpo

    def rows(rpos: list[float], lag: float = 0.0) -> list[dict[str, object]]:
        return [{"t": 5.0 * i, "src_seq": i, "dr_seq": i, "rpo_s": v, "read_s": 0.1,
                 "libvirt_lag_s": lag, "job": True} for i, v in enumerate(rpos)]

    def hist(middle_bin: int) -> dict[str, object]:
        bins = [0] * (len(_rpo.HIST_BOUNDARIES) + 1)
        bins[middle_bin] = 100
        return {"boundaries": _rpo.HIST_BOUNDARIES, "bins": bins}

    raw = {"window_s": 1800.0, "interval_s": 5.0, "rate": 20, "started": "x",
           "late_cycles": 0, "load1": [1.0, 3.0, 2.0],
           "samples": {"snap": rows([float(i) for i in range(1, 21)]),
                       "async": rows([0.0] * 18 + [0.05, 0.05]), "sync": rows([0.0] * 20)},
           "cycles": [{"took_s": 4.0, "ok": True}, {"took_s": 6.0, "ok": False}],
           "hist": {m: {"wr": hist(40 if m == "sync" else 30), "flush": hist(30)}
                    for m in ("snap", "async", "sync", "base")},
           "probes": {"base": [6.0, 6.4], "sync": [9.0]},
           "mirror_state": {"async": {"state": "stopped"}}}
    r = replica_rpo.reduce(raw)
    assert r["snap"]["median_s"] == 10.5 and r["snap"]["p95_s"] == 19.0
    assert r["snap"]["cycles"] == 2 and r["snap"]["failed_cycles"] == 1
    assert r["async"]["zero_samples"] == 18 and r["async"]["p95_s"] == 0.05
    assert r["sync"]["libvirt_in_step"] == 20 and r["sync"]["max_s"] == 0.0
    assert r["load1"] == {"median": 2.0, "max": 3.0}
    assert r["probe_ms"]["base"] == {"n": 2, "median": 6.2}
    b = _rpo.HIST_BOUNDARIES
    assert r["lat"]["sync"]["wr"]["median_ms"] == pytest.approx((b[39] * b[40]) ** 0.5 / 1e6)
    text = "\n".join(replica_rpo.rows(r))
    assert "0 over 30 min: met" in text and "p95 ≤ 10 s over 30 min: met" in text
    cost = (b[39] * b[40]) ** 0.5 / 1e6 - (b[29] * b[30]) ** 0.5 / 1e6
    assert f"write {cost:+.2f}" in text
