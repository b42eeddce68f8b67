"""The agent's wall clock: UNIX seconds from vmdr.timeutil (the one wall-clock reader).
Everything in the agent takes a ``clock`` callable defaulting to :func:`wall`, so tests
and benchmarks can move time."""

from __future__ import annotations

from datetime import UTC, datetime

from vmdr.timeutil import utcnow


def wall() -> float:
    return utcnow().timestamp()


def stamp(t: float) -> str:
    """``20261206020000``: the sortable UTC prefix of job ids."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d%H%M%S")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
