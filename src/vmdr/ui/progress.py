"""Progress as events, with renderers: a terminal bar (rate, ETA), JSON lines, or nothing.

Jobs call ``Progress.advance(n)``; they never print. The CLI picks the renderer.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts bytes done against a total; thread-safe. The base class renders nothing."""

    def __init__(self, total: int = 0, label: str = "") -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def set_total(self, total: int, label: str | None = None) -> None:
        with self._lock:
            self.total = total
            if label is not None:
                self.label = label

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
        self.render(final=False)

    def render(self, final: bool) -> None:
        pass

    def finish(self) -> None:
        self.render(final=True)


class BarProgress(Progress):
    def __init__(self, total: int = 0, label: str = "", stream: TextIO = sys.stderr) -> None:
        super().__init__(total, label)
        self.stream = stream
        self._last = 0.0

    def render(self, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.2:
            return
        self._last = now
        elapsed = max(1e-6, now - self.start)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        width = 24
        fill = int(width * min(1.0, pct / 100)) if self.total else 0
        bar = "#" * fill + "-" * (width - fill)
        line = (f"\r{self.label[:20]:<20} [{bar}] {pct:5.1f}% {human_bytes(self.done):>10} "
                f"{human_bytes(rate)}/s ETA {human_seconds(eta)}")
        self.stream.write(line + ("\n" if final else ""))
        self.stream.flush()


class JsonProgress(Progress):
    """One JSON object per line on stderr, at most twice a second."""

    def __init__(self, total: int = 0, label: str = "", stream: TextIO = sys.stderr) -> None:
        super().__init__(total, label)
        self.stream = stream
        self._last = 0.0

    def render(self, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.5:
            return
        self._last = now
        self.stream.write(json.dumps({"event": "progress", "label": self.label,
                                      "done": self.done, "total": self.total,
                                      "final": final}) + "\n")
        self.stream.flush()


def make_progress(enabled: bool, json_mode: bool = False) -> Progress:
    if not enabled:
        return Progress()
    if json_mode:
        return Progress()
    if sys.stderr.isatty():
        return BarProgress()
    return Progress()
