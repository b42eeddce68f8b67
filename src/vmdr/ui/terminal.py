"""The terminal renderer: one live bar per item (disk, VM, copy) with rate and ETA, and
the job's narration and warnings printed above the bars.

Only for a terminal: the bars are redrawn in place with ANSI cursor movement, so the
caller picks this renderer only when stderr is a TTY (:func:`vmdr.ui.make_sink`).

Layout while a job runs (one line per item that is running; finished items leave one
summary line above, which scrolls away like any output)::

    vmdr: web1: reading 2 disks (full, checkpoint, quiesced)
    web1/vda     ━━━━━━━━━━━─────   68%   5.4 GiB/8.0 GiB   212.0 MiB/s  ETA 0:12
    web1/vdb     ━━━━━━──────────   35%   1.1 GiB/3.0 GiB   187.3 MiB/s  ETA 0:10

Finished items: the same line with "in 0:42" (elapsed) instead of the ETA. Without a
total (``check --read-data``) a short segment walks along the bar.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from vmdr.events import (
    BytesProgress,
    Event,
    JobError,
    JobFinished,
    JobWarning,
    PhaseStarted,
)
from vmdr.ui.progress import human_bytes, human_seconds

REDRAW = 0.2  # seconds between two redraws of the bars
RATE_WINDOW = 5.0  # seconds of history behind the rate (and so the ETA)


@dataclass
class _Item:
    name: str
    done: int = 0
    total: int | None = None
    started: float = field(default_factory=time.monotonic)
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def update(self, done: int, total: int | None, now: float) -> None:
        self.done, self.total = done, total
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()

    def rate(self, now: float) -> float:
        """Bytes per second over the last few seconds (the whole run at first)."""
        if len(self.samples) >= 2 and self.samples[-1][0] > self.samples[0][0]:
            (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
            return max(0.0, (d1 - d0) / (t1 - t0))
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0.5 else 0.0


class TerminalRenderer:
    """An :class:`~vmdr.events.EventSink` drawing bars on a terminal (*stream*)."""

    def __init__(self, stream: TextIO = sys.stderr, unicode: bool | None = None) -> None:
        self.stream = stream
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        self.unicode = unicode if unicode is not None else enc == "utf8"
        self.items: dict[str, _Item] = {}
        self._drawn = 0  # bar lines currently on screen, below the cursor's line start
        self._last_draw = 0.0

    # -- the sink ---------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, BytesProgress):
            self._progress(event, now)
        elif isinstance(event, PhaseStarted):
            if event.message:
                self._print(f"vmdr: {event.message}")
        elif isinstance(event, JobWarning):
            who = f"{event.item}: " if event.item else ""
            self._print(f"vmdr: warning: {who}{event.message}")
        elif isinstance(event, JobError):
            if event.item:  # a job-level error is printed by the CLI, once
                self._item_failed(event.item, event.message, now)
        elif isinstance(event, JobFinished):
            if event.outcome == "ok" or not self.items:
                self._clear()
            else:  # failed or interrupted: leave the bars where they stopped
                self._redraw(time.monotonic())
                self._drawn = 0
            self.items.clear()
            self.stream.flush()

    def _progress(self, ev: BytesProgress, now: float) -> None:
        item = self.items.get(ev.item)
        if item is None:
            item = self.items[ev.item] = _Item(ev.item, started=now - ev.elapsed_s)
        item.update(ev.done, ev.total, now)
        if ev.final:
            del self.items[ev.item]
            self._print(self._line(item, now, final=True))
        elif now - self._last_draw >= REDRAW or len(self.items) != self._drawn:
            self._redraw(now)

    def _item_failed(self, item: str, message: str, now: float) -> None:
        """The item's bars (a VM's disks) stop where they were, as plain lines."""
        self._clear()
        for name in [n for n in self.items if n == item or n.startswith(item + "/")]:
            self.stream.write(self._line(self.items.pop(name), now) + "\n")
        self._print(f"vmdr: {item}: failed: {message}")

    # -- drawing ----------------------------------------------------------------------
    def _size(self) -> os.terminal_size:
        """The terminal's size (of the stream itself: stdout may be redirected)."""
        try:
            return os.get_terminal_size(self.stream.fileno())
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return os.terminal_size((100, 24))

    def _width(self) -> int:
        return self._size().columns

    def _clear(self) -> None:
        """Remove the bars; the cursor ends where the first bar was."""
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _print(self, text: str) -> None:
        """A line of output above the bars, which are then drawn again below it."""
        self._clear()
        self.stream.write(text + "\n")
        self._redraw(time.monotonic())

    def _redraw(self, now: float) -> None:
        self._clear()
        lines = [self._line(it, now) for it in self.items.values()]
        rows = self._size().lines
        if len(lines) >= rows:  # keep the block on screen, or the cursor math breaks
            hidden = len(lines) - rows + 2
            lines = [*lines[: rows - 2], f"… and {hidden} more"]
        for line in lines:
            self.stream.write(line + "\n")
        self._drawn = len(lines)
        self._last_draw = now
        self.stream.flush()

    def _name_width(self, it: _Item) -> int:
        longest = max([len(i.name) for i in self.items.values()] + [len(it.name)])
        return max(12, min(32, longest))

    def _line(self, it: _Item, now: float, final: bool = False) -> str:
        width = self._width() - 1
        rate = it.done / max(1e-6, now - it.started) if final else it.rate(now)
        nw = self._name_width(it)
        name = _shorten(it.name, nw)
        if it.total is not None:
            frac = min(1.0, it.done / it.total) if it.total else 1.0
            amount = _amount(it.done, it.total)
            pct = f"{100 * frac:3.0f}%"
        else:
            frac = 1.0 if final else -1.0
            amount, pct = human_bytes(it.done), "    "
        if final:
            tail = f"in {human_seconds(now - it.started)}"
        elif it.total and rate > 0:
            tail = f"ETA {human_seconds((it.total - it.done) / rate)}"
        else:
            tail = f"{human_seconds(now - it.started)}"
        text = f"{pct} {amount:>21} {human_bytes(rate) + '/s':>12}  {tail}"
        bar_w = min(40, width - nw - 4 - 50)  # the same for every line
        if bar_w < 10:  # a narrow terminal: no bar
            return f"{name:<{nw}}  {text}"[:width]
        return f"{name:<{nw}}  {self._bar(frac, bar_w, now)}  {text}"

    def _bar(self, frac: float, w: int, now: float) -> str:
        """*w* cells: done in colour, the rest dim (``#``/``-`` without unicode)."""
        full, rest = ("━", "─") if self.unicode else ("#", "-")
        if frac < 0:  # total unknown: a segment walks along
            pos = int(now * 8) % w
            cells = [full if 0 <= i - pos < 4 else rest for i in range(w)]
            return f"\x1b[36m{''.join(cells)}\x1b[0m" if self.unicode else "".join(cells)
        n = min(w, int(frac * w + 0.5))
        if not self.unicode:
            return full * n + rest * (w - n)
        colour = "32" if frac >= 1 else "35"
        return f"\x1b[{colour}m{full * n}\x1b[0m\x1b[2m{rest * (w - n)}\x1b[0m"


def _shorten(name: str, width: int) -> str:
    """*name* in *width* cells; a long one loses its middle, so ``vm/disk`` keeps both the
    start of the VM's name and the disk."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 2] + "…" + name[len(name) - keep // 2:]


def _amount(done: int, total: int) -> str:
    return f"{human_bytes(done)}/{human_bytes(total)}"


class WarningPrinter:
    """For a pipe, a log file, ``--no-progress`` or ``--json``: no bars and no narration,
    but warnings still reach stderr as ``vmdr: warning: …`` lines."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def __call__(self, event: Event) -> None:
        if isinstance(event, JobWarning):
            who = f"{event.item}: " if event.item else ""
            self.stream.write(f"vmdr: warning: {who}{event.message}\n")
            self.stream.flush()
