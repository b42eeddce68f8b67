"""Renderers of job events (:mod:`vmdr.events`): the terminal bars and JSON lines."""

from __future__ import annotations

import sys
from typing import TextIO

from vmdr.events import EventSink


def make_sink(json_events: bool = False, bars: bool = True,
              stream: TextIO | None = None) -> EventSink:
    """The renderer the CLI's options ask for, writing to *stream* (stderr):

    * ``--json-events``: every event as a JSON line (and nothing else on stderr);
    * else bars, narration and warnings when *bars* and the stream is a terminal;
    * else warnings only: a pipe or a log file gets no progress noise.
    """
    out = stream or sys.stderr
    if json_events:
        from vmdr.ui.jsonlines import JsonLinesRenderer

        return JsonLinesRenderer(out)
    from vmdr.ui.terminal import TerminalRenderer, WarningPrinter

    if bars and _isatty(out):
        return TerminalRenderer(out)
    return WarningPrinter(out)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
