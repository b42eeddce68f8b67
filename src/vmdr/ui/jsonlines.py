"""The JSON-lines renderer of ``--json-events``: every event as one JSON object on one line
(schema: docs/events.md). Each line is written and flushed whole, so a reader that reads
stderr line by line always gets complete objects."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from vmdr.events import Event


def event_line(event: Event) -> str:
    """The event as one line of JSON (ASCII only, so no byte of it can be a newline)."""
    return json.dumps(event.as_dict(), default=_plain, separators=(",", ":")) + "\n"


def _plain(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


class JsonLinesRenderer:
    """An :class:`~vmdr.events.EventSink` writing JSON lines to *stream*."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def __call__(self, event: Event) -> None:
        try:
            self.stream.write(event_line(event))
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away (or the stream is closed): the job goes on
