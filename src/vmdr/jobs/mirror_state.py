"""A continuous mirror's state at the DR site, and the pure decisions about it.

The supervisor (:mod:`vmdr.jobs.mirror`) writes ``mirror.json`` next to the replica's
``replica.json`` every few seconds: the mode, what the mirror is doing, and the last
instant the DR copy was known to equal the source (``in_sync_at``). ``vmdr replicate
status`` reads it from the DR host, so a mirror whose supervisor died simply stops being
fresh: its achieved RPO grows from the last report.

SLA states follow Zerto's: **Meeting SLA**, **RPO Not Meeting SLA**, **Error** (nothing is
replicating: the mirror fell back and the last snapshot cycle failed too), **Paused** (an
operator stopped it), plus **Initializing** before the first restore point.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import IntegrityError
from vmdr.jobs.replicate_state import INITIALIZING, MEETING, NO_TARGET, NOT_MEETING, ReplicaState

MIRROR_FILE = "mirror.json"
MODES = ("snapshot", "mirror", "sync")
ERROR = "error"
PAUSED = "paused"
LABELS = {  # Zerto's wording, for people
    MEETING: "Meeting SLA",
    NOT_MEETING: "RPO Not Meeting SLA",
    ERROR: "Error",
    PAUSED: "Paused",
    INITIALIZING: "Initializing",
    NO_TARGET: "No RPO target",
}

# what a mirror is doing (MirrorState.state)
STARTING = "starting"  # supervisor up, snapshot cycle / export / job being set up
COPYING = "copying"  # the job runs, the initial copy is not complete
MIRRORING = "mirroring"  # in step with the source (async: caught up at the last report)
FALLBACK = "fallback"  # the mirror was aborted: snapshot cycles until it can start again
STOPPED = "stopped"  # `vmdr replicate stop`: torn down by the operator


@dataclass
class MirrorState:
    vm: str
    mode: str  # mirror | sync
    state: str = STARTING
    since: str = ""  # ISO UTC: when the current state began
    updated: str = ""  # ISO UTC: the supervisor's last report
    in_sync_at: str | None = None  # ISO UTC: last instant the DR copy equalled the source
    bytes_mirrored: int = 0  # written by the mirror jobs since they started (all disks)
    lag_bytes: int = 0  # not yet at the DR copy at the last report (async)
    starts: int = 0  # mirror jobs started by this supervisor
    aborts: int = 0  # mirror jobs aborted (link failure, stall, job error)
    error: str | None = None  # why the last mirror was aborted
    supervisor: str = ""  # host:pid of the supervisor
    events: list[dict[str, Any]] = field(default_factory=list)  # last transitions

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> MirrorState:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{where}: unreadable mirror state ({exc})") from None

    def move(self, state: str, when: datetime, error: str | None = None) -> None:
        """Enter ``state`` (remembering the last 20 transitions)."""
        if state != self.state or error:
            self.events = [*self.events, {"time": when.isoformat(), "state": state,
                                          "error": error}][-20:]
        if state != self.state:
            self.since = when.isoformat()
        self.state = state
        if error is not None:
            self.error = error


def _age(now: datetime, iso: str | None) -> float | None:
    if not iso:
        return None
    return max(0.0, (now - datetime.fromisoformat(iso)).total_seconds())


def achieved_rpo(st: ReplicaState | None, ms: MirrorState | None,
                 now: datetime) -> float | None:
    """Seconds of writes the DR site would lose now: the younger of the newest restore
    point and the mirror's last in-sync instant (None: nothing at the DR site yet)."""
    ages = [a for a in (_age(now, st.newest.time if st and st.newest else None),
                        _age(now, ms.in_sync_at if ms else None)) if a is not None]
    return min(ages) if ages else None


def sla_state(st: ReplicaState | None, ms: MirrorState | None, now: datetime,
              target_s: float | None) -> tuple[str, float | None]:
    """(SLA state, achieved RPO) of one replica, in Zerto's sense."""
    age = achieved_rpo(st, ms, now)
    if ms is not None and ms.state == STOPPED and (
            st is None or st.newest is None or st.newest.time <= (ms.since or "")):
        return PAUSED, age
    if age is None:
        return INITIALIZING, None
    last_failed = bool(st and st.cycles and st.cycles[-1].error)
    mirror_down = ms is None or ms.state in (FALLBACK, STOPPED, STARTING)
    if last_failed and mirror_down and (target_s is None or age > target_s):
        return ERROR, age
    if target_s is None:
        return NO_TARGET, age
    return (MEETING if age <= target_s else NOT_MEETING), age


# -- supervision ---------------------------------------------------------------------------


@dataclass
class Progress:
    """What the supervisor remembers between two looks at the jobs."""

    cur: int = -1
    changed_at: float = 0.0  # monotonic time cur last moved (or the job was in step)


def assess(statuses: list[tuple[str, int, int, bool]], tunnel_alive: bool,
           progress: dict[str, Progress], now: float, stall_s: float) -> tuple[str, str | None]:
    """Judge the mirror from each disk's ``(disk, cur, end, active)`` job status:
    ``("mirroring"|"copying", None)`` or ``("abort", why)``.

    Abort when the link is gone, when a job ended by itself (QEMU failed it on a write
    error at the target), or when a job behind the source made no progress for
    ``stall_s`` seconds (a partition the link has not noticed yet)."""
    if not tunnel_alive:
        return "abort", "the link to the DR site is down (ssh tunnel ended)"
    in_step = True
    for disk, cur, end, active in statuses:
        if not active:
            return "abort", f"the mirror job of {disk} ended (write error at the DR site?)"
        p = progress.setdefault(disk, Progress(cur, now))
        if cur != p.cur or cur == end:
            p.cur, p.changed_at = cur, now
        elif now - p.changed_at > stall_s:
            return "abort", (f"the mirror of {disk} made no progress for {stall_s:.0f}s "
                             f"({end - cur} bytes behind): the DR site is not answering")
        if end == 0 or cur != end:
            in_step = False
    return (MIRRORING if in_step else COPYING), None


def retry_delay(aborts_in_row: int, base_s: float, cap_s: float = 600.0) -> float:
    """Seconds to wait before the next mirror start after ``aborts_in_row`` aborts:
    ``base_s`` doubled per further abort, at most ``cap_s``."""
    if aborts_in_row <= 0:
        return 0.0
    return float(min(cap_s, base_s * (2 ** min(aborts_in_row - 1, 10))))
