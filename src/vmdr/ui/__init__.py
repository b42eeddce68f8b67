"""Renderers of job events (:mod:`vmdr.events`): the terminal bars and JSON lines."""

from __future__ import annotations

import sys
from typing import TextIO

from vmdr.events import EventSink, null_sink


def make_sink(json_events: bool = False, bars: bool = True,
              stream: TextIO | None = None) -> EventSink:
    """The renderer the CLI's options ask for, writing to *stream* (stderr):

    * ``--json-events``: every event as a JSON line (and nothing else on stderr);
    * else bars, narration and warnings when *bars* and the stream is a terminal;
    * else nothing: a pipe or a log file gets no progress noise.
    """
    out = stream or sys.stderr
    if json_events:
        from vmdr.ui.jsonlines import JsonLinesRenderer

        return JsonLinesRenderer(out)
    if bars and _isatty(out):
        from vmdr.ui.terminal import TerminalRenderer

        return TerminalRenderer(out)
    return null_sink


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
