"""Job events: the one typed stream every job reports through (schema: docs/events.md).

A job never prints. It is handed a :class:`JobEvents` — bound to a job id and an
:class:`EventSink` — and reports phases, byte progress per item (a disk, a VM, a copy),
warnings and errors through it. Who listens is the caller's business: the CLI renders the
stream as terminal bars or JSON lines (:mod:`vmdr.ui`), the agent records it.

Every layer may import this module (like :mod:`vmdr.errors`); it imports only
:mod:`vmdr.timeutil`, the one wall-clock reader.

The events, in the order a job emits them::

    JobStarted     "start"     once, first
    PhaseStarted   "phase"     a named step begins (for the whole job or one item)
    BytesProgress  "progress"  bytes done of an item, at most 4 a second per item, and
                               always a final one
    JobWarning     "warning"   something the operator should know; the job goes on
    JobError       "error"     an item failed (the job may go on), or the job failed
    JobFinished    "end"       once, last — also when the job fails

Sinks are called one event at a time (the emitter serialises them), so a sink needs no
lock of its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar, Literal, Protocol

from vmdr.timeutil import Clock, format_time, utcnow

SCHEMA_VERSION = 1
JOB_ID_ENV = "VMDR_JOB_ID"
PROGRESS_INTERVAL = 0.25  # seconds between two progress events of one item (≤ 4/s)

Outcome = Literal["ok", "partial", "failed", "interrupted"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """What every event carries: its job, when (UTC), and its place in the job's stream."""

    type: ClassVar[str] = ""
    job: str
    time: datetime
    seq: int

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: ``type``, ``time`` (ISO 8601 UTC), ``job``, ``seq``, then the
        event's own fields."""
        d: dict[str, Any] = {"type": self.type, "time": format_time(self.time),
                             "job": self.job, "seq": self.seq}
        for f in fields(self):
            if f.name not in d:
                d[f.name] = getattr(self, f.name)
        return d


@dataclass(frozen=True, kw_only=True)
class JobStarted(Event):
    """The job began. *kind* names it (``backup``, ``image backup``…); *args* are its
    parameters as given (never secrets)."""

    type: ClassVar[str] = "start"
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION
    pid: int = 0


@dataclass(frozen=True, kw_only=True)
class PhaseStarted(Event):
    """A step of the job (or of one *item*) began; *message* says it for humans, *detail*
    adds what a program may want (e.g. the NBD exports of an instant restore)."""

    type: ClassVar[str] = "phase"
    phase: str
    item: str | None = None
    message: str = ""
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class BytesProgress(Event):
    """*done* of *total* bytes of *item* (total None: not known yet). *final* marks the
    item's last progress event."""

    type: ClassVar[str] = "progress"
    item: str
    done: int
    total: int | None
    elapsed_s: float
    final: bool = False
    unit: str = "bytes"


@dataclass(frozen=True, kw_only=True)
class JobWarning(Event):
    """Something went less well than asked; the job goes on."""

    type: ClassVar[str] = "warning"
    message: str
    item: str | None = None


@dataclass(frozen=True, kw_only=True)
class JobError(Event):
    """*item* failed (the job may go on with the others), or, without an item, the job
    failed; *exit_code* is the one the failure maps to (docs: exit codes)."""

    type: ClassVar[str] = "error"
    message: str
    exit_code: int
    item: str | None = None


@dataclass(frozen=True, kw_only=True)
class JobFinished(Event):
    """The job ended. *result* is what ``--json`` prints (None when the job failed
    before it had one); *message* the error line when it did not succeed."""

    type: ClassVar[str] = "end"
    outcome: Outcome
    exit_code: int
    message: str | None = None
    result: Any = None
    duration_s: float = 0.0


EVENT_TYPES: tuple[type[Event], ...] = (JobStarted, PhaseStarted, BytesProgress, JobWarning,
                                        JobError, JobFinished)


class EventSink(Protocol):
    """Receives events, one at a time."""

    def __call__(self, event: Event) -> None: ...


def null_sink(event: Event) -> None:
    """Drops every event."""


class ListSink:
    """Keeps every event (tests; an in-process caller that wants the record)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class FanOut:
    """Hands every event to several sinks, in order."""

    def __init__(self, sinks: Sequence[EventSink]) -> None:
        self.sinks = list(sinks)

    def __call__(self, event: Event) -> None:
        for s in self.sinks:
            s(event)


HA_KINDS = ("detected", "fenced", "self-fenced", "placed", "started", "ready", "gave-up",
            "migrated", "maintenance", "tested", "restored")


@dataclass(frozen=True)
class HADecision:
    """One high-availability decision (docs/events.md, "HA decisions"): not part of a
    job's stream but of the fleet's decision log in etcd (``ha/events/…``), written by the
    agents and read by ``vmdr ha events``. *time* is UNIX seconds; *kind* one of
    :data:`HA_KINDS`; *reason* says why, for humans; *detail* adds figures (seconds since
    detection, the hosts a VM was found running on...)."""

    time: float
    kind: str
    host: str | None
    vm: str | None
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in HA_KINDS:
            raise ValueError(f"unknown HA event kind {self.kind!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, "kind": self.kind, "host": self.host, "vm": self.vm,
                "reason": self.reason, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HADecision:
        return cls(float(d.get("time", 0)), str(d.get("kind", "")), d.get("host"),
                   d.get("vm"), str(d.get("reason", "")), dict(d.get("detail") or {}))


def new_job_id() -> str:
    """The job id from ``VMDR_JOB_ID`` when set (the caller correlates by it), else a
    fresh random one."""
    given = os.environ.get(JOB_ID_ENV, "").strip()
    return given or os.urandom(8).hex()


class JobEvents:
    """What a job reports through: one job id, one sink, a clock. Thread-safe; events
    reach the sink in ``seq`` order, one at a time.

    ``JobEvents()`` with no sink drops everything, so jobs can take it as optional.
    """

    def __init__(self, sink: EventSink | None = None, job: str | None = None,
                 clock: Clock = utcnow, interval: float = PROGRESS_INTERVAL) -> None:
        self.sink: EventSink = sink or null_sink
        self.job = job or os.urandom(8).hex()
        self.clock = clock
        self.interval = interval
        self._seq = 0
        self._lock = threading.RLock()
        self._t0 = time.monotonic()
        self.started = False
        self.ended = False
        self._job_error = False  # an item-less error was emitted
        self._last_error: str | None = None  # "item: message" of the last item error

    def emit(self, make: Callable[..., Event], **fields_: Any) -> None:
        """Build an event of class *make* with the next ``seq`` and hand it on."""
        with self._lock:
            self._seq += 1
            self.sink(make(job=self.job, time=self.clock(), seq=self._seq, **fields_))

    # -- the job's life ---------------------------------------------------------------
    def start(self, kind: str, **args: Any) -> None:
        """Emit ``start`` (once: later calls are ignored)."""
        with self._lock:
            if self.started:
                return
            self.started = True
            self._t0 = time.monotonic()
            self.emit(JobStarted, kind=kind, args=args, pid=os.getpid())

    def finish(self, outcome: Outcome, exit_code: int = 0, message: str | None = None,
               result: Any = None) -> None:
        """Emit ``end`` (once); a failure without an ``error`` event before it gets one.
        A failure without a *message* takes the last item error's (``VM: message``)."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
            if outcome != "ok" and not message:
                message = self._last_error
            if outcome != "ok" and message and not self._job_error:
                self.emit(JobError, message=message, exit_code=exit_code)
            self.emit(JobFinished, outcome=outcome, exit_code=exit_code, message=message,
                      result=result, duration_s=round(time.monotonic() - self._t0, 3))

    # -- during the job -----------------------------------------------------------------
    def phase(self, phase: str, message: str = "", item: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        self.emit(PhaseStarted, phase=phase, item=item, message=message, detail=detail)

    def warning(self, message: str, item: str | None = None) -> None:
        self.emit(JobWarning, message=message, item=item)

    def error(self, message: str, exit_code: int, item: str | None = None) -> None:
        with self._lock:
            if item is None:
                self._job_error = True
            else:
                self._last_error = f"{item}: {message}"
            self.emit(JobError, message=message, exit_code=exit_code, item=item)

    def progress(self, item: str, total: int | None = None) -> ItemProgress:
        """A byte counter for *item*; it emits ``progress`` events, throttled."""
        return ItemProgress(self, item, total)


class ItemProgress:
    """Bytes done of one item. ``advance`` is thread-safe and cheap: it emits at most one
    event per interval; ``finish`` emits the final one (once)."""

    def __init__(self, events: JobEvents, item: str, total: int | None = None) -> None:
        self.events, self.item, self.total = events, item, total
        self.done = 0
        self._t0 = time.monotonic()
        self._last = float("-inf")
        self._finished = False
        self._lock = threading.Lock()

    def set_total(self, total: int | None) -> None:
        with self._lock:
            self.total = total

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            self._maybe_emit()

    def update(self, done: int, total: int | None) -> None:
        """Set the absolute count (for work measured elsewhere, e.g. a block job)."""
        with self._lock:
            self.done, self.total = done, total
            self._maybe_emit()

    def _maybe_emit(self) -> None:
        """Called with the lock held: an event unless one went out within the interval."""
        now = time.monotonic()
        if self._finished or now - self._last < self.events.interval:
            return
        self._last = now
        self._emit(now, final=False)

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._emit(time.monotonic(), final=True)

    def _emit(self, now: float, final: bool) -> None:
        self.events.emit(BytesProgress, item=self.item, done=self.done, total=self.total,
                         elapsed_s=round(now - self._t0, 3), final=final)
