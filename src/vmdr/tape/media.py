"""Media, media sets, pools and the seed's slot rotation: pure data and decisions.

Nothing here touches a device; every decision takes ``now`` (tests/unit/test_tape_pool.py
drives it with no drive at all, as PBS's tape tests do).

- A **pool** says how tapes are allocated (``continue``: append to the current media set;
  ``always``: a new set per backup; a calendar ``daily``/``weekly``/``monthly`` or weekday
  list such as ``mon,thu``: a new set at the first backup after each such day starts;
  ``rotation``: the seed's next-slot rotation), how long a set is kept (``keep`` forever,
  ``overwrite`` at once, or a duration such as ``30d``), WORM (a tape is never rewritten)
  and an optional key file that seals every payload.
- A **media set** is the ordered list of tapes one run of backups filled (sequence 0, 1…).
- A tape may be overwritten only when its set's last write is older than the retention,
  it is not WORM, and it is not in a vault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from vmdr.errors import MediaRefused, UsageError
from vmdr.timeutil import format_time, parse_time

_DUR = re.compile(r"^(\d+)([smhdwy])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALLOCATIONS = ("continue", "always", "rotation", "daily", "weekly", "monthly")


def parse_retention(text: str) -> float | None:
    """Seconds a set must be kept; ``keep`` → None (forever), ``overwrite`` → 0."""
    if text == "keep":
        return None
    if text == "overwrite":
        return 0.0
    m = _DUR.match(text)
    if not m:
        raise UsageError(f"bad retention {text!r}: keep, overwrite, or a duration like 30d")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


def check_allocation(text: str) -> str:
    days = text.split(",")
    if text in ALLOCATIONS or all(d in WEEKDAYS for d in days):
        return text
    raise UsageError(f"bad allocation {text!r}: continue, always, rotation, daily, weekly, "
                     "monthly or weekdays like mon,thu")


@dataclass
class Pool:
    name: str
    allocation: str = "continue"
    retention: str = "30d"
    worm: bool = False
    key_file: str | None = None
    vault: str | None = None  # where this pool's full sets go (for `vmdr tape vault`)

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "allocation": self.allocation, "retention": self.retention,
                "worm": self.worm, "key_file": self.key_file, "vault": self.vault}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Pool:
        return cls(str(d["name"]), str(d.get("allocation", "continue")),
                   str(d.get("retention", "30d")), bool(d.get("worm")), d.get("key_file"),
                   d.get("vault"))


@dataclass
class TapeFile:
    number: int
    kind: str
    ids: list[str] = field(default_factory=list)  # chunk or snapshot object IDs (hex)
    bytes: int = 0


@dataclass
class Media:
    uuid: str
    label: str  # the barcode, or a name for changers without a reader
    pool: str
    created: datetime
    media_set: str | None = None
    seq: int = 0
    files: list[TapeFile] = field(default_factory=list)
    full: bool = False
    location: str = "library"  # "library" | "vault:NAME" | "offline"
    last_written: datetime | None = None
    worm: bool = False

    @property
    def in_vault(self) -> str | None:
        return self.location[6:] if self.location.startswith("vault:") else None

    def to_doc(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "label": self.label, "pool": self.pool,
                "created": format_time(self.created), "media_set": self.media_set,
                "seq": self.seq, "full": self.full, "location": self.location,
                "last_written": format_time(self.last_written) if self.last_written else None,
                "worm": self.worm,
                "files": [{"number": f.number, "kind": f.kind, "ids": f.ids, "bytes": f.bytes}
                          for f in self.files]}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> Media:
        return cls(str(d["uuid"]), str(d["label"]), str(d["pool"]), parse_time(d["created"]),
                   d.get("media_set"), int(d.get("seq", 0)),
                   [TapeFile(int(f["number"]), str(f["kind"]), list(f.get("ids", [])),
                             int(f.get("bytes", 0))) for f in d.get("files", [])],
                   bool(d.get("full")), str(d.get("location", "library")),
                   parse_time(d["last_written"]) if d.get("last_written") else None,
                   bool(d.get("worm")))


@dataclass
class MediaSet:
    uuid: str
    pool: str
    created: datetime
    repo_id: str = ""
    media: list[str] = field(default_factory=list)  # tape uuids by sequence number
    last_written: datetime | None = None
    closed: bool = False

    def to_doc(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "pool": self.pool, "created": format_time(self.created),
                "repo_id": self.repo_id, "media": self.media, "closed": self.closed,
                "last_written": format_time(self.last_written) if self.last_written else None}

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> MediaSet:
        return cls(str(d["uuid"]), str(d["pool"]), parse_time(d["created"]),
                   str(d.get("repo_id", "")), list(d.get("media", [])),
                   parse_time(d["last_written"]) if d.get("last_written") else None,
                   bool(d.get("closed")))


# --------------------------------------------------------------------- decisions
def calendar_start(allocation: str, now: datetime) -> datetime | None:
    """The latest calendar boundary at or before *now* (None: not a calendar policy)."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if allocation == "daily":
        return day
    if allocation == "weekly":
        return day - timedelta(days=day.weekday())
    if allocation == "monthly":
        return day.replace(day=1)
    days = allocation.split(",")
    if all(d in WEEKDAYS for d in days):
        wanted = {WEEKDAYS.index(d) for d in days}
        back = next(i for i in range(7) if (day.weekday() - i) % 7 in wanted)
        return day - timedelta(days=back)
    return None


def needs_new_set(pool: Pool, current: MediaSet | None, now: datetime) -> bool:
    """Whether the next backup of *pool* starts a new media set."""
    if current is None or current.closed:
        return True
    if pool.allocation in ("always", "rotation"):
        return True
    start = calendar_start(pool.allocation, now)
    return start is not None and current.created < start


def overwrite_refusal(media: Media, pool: Pool, sets: dict[str, MediaSet],
                      now: datetime) -> str | None:
    """Why *media* may not be overwritten now, or None when it may."""
    if media.pool != pool.name:
        return f"tape {media.label} belongs to pool {media.pool!r}, not {pool.name!r}"
    if media.in_vault:
        return f"tape {media.label} is in vault {media.in_vault}"
    if media.media_set is None:
        return None  # labelled, never written
    if media.worm or pool.worm:
        return f"tape {media.label} is WORM media and already holds data"
    ms = sets.get(media.media_set)
    keep = parse_retention(pool.retention)
    if keep is None:
        return f"pool {pool.name} keeps its tapes forever (retention keep)"
    last = (ms.last_written if ms and ms.last_written else media.last_written) or media.created
    until = last + timedelta(seconds=keep)
    if now < until:
        return f"tape {media.label} is retained until {format_time(until)[:19]}Z"
    return None


def check_overwrite(media: Media, pool: Pool, sets: dict[str, MediaSet], now: datetime) -> None:
    why = overwrite_refusal(media, pool, sets, now)
    if why:
        raise MediaRefused(f"refusing to overwrite: {why}")


def choose_free_media(pool: Pool, media: list[Media], sets: dict[str, MediaSet], now: datetime,
                      present: set[str] | None = None, exclude: set[str] | None = None
                      ) -> Media | None:
    """A tape for a new media set or the next tape of a set: a never-written tape of the
    pool first, then the one whose retention ran out longest ago. *present*: labels in the
    library (None: any); *exclude*: uuids already in the current set."""
    cands = [m for m in media if m.pool == pool.name and not m.in_vault
             and (present is None or m.label in present)
             and m.uuid not in (exclude or set())
             and overwrite_refusal(m, pool, sets, now) is None]
    fresh = [m for m in cands if m.media_set is None]
    if fresh:
        return sorted(fresh, key=lambda m: (m.created, m.label))[0]

    def last(m: Media) -> datetime:
        ms = sets.get(m.media_set or "")
        return (ms.last_written if ms and ms.last_written else m.last_written) or m.created
    return min(cands, key=last) if cands else None


# --------------------------------------------------------------------- the seed's rotation
@dataclass
class Rotation:
    """The seed script's state: ``slot`` (last used), ``maxslot`` and ``history`` (one
    line per use: time, slot, tape label). Kept as those three small files so an operator
    who knew the script recognises them."""

    slot: int
    maxslot: int
    history: list[tuple[datetime, int, str]] = field(default_factory=list)

    def next_slot(self) -> int:
        """The slot after the last used one, wrapping after ``maxslot`` to 1."""
        if self.maxslot < 1:
            raise UsageError("rotation needs maxslot ≥ 1")
        return self.slot % self.maxslot + 1

    def used(self, slot: int, label: str, now: datetime) -> None:
        self.slot = slot
        self.history.append((now, slot, label))

    def last_use(self, slot: int) -> datetime | None:
        times = [t for t, s, _ in self.history if s == slot]
        return max(times) if times else None

    def history_text(self) -> str:
        return "".join(f"{format_time(t)} {s} {lbl}\n" for t, s, lbl in self.history)

    @classmethod
    def parse(cls, slot: str, maxslot: str, history: str) -> Rotation:
        try:
            rows = []
            for line in history.splitlines():
                if line.strip():
                    t, s, lbl = line.split(" ", 2)
                    rows.append((parse_time(t), int(s), lbl))
            return cls(int(slot.strip() or 0), int(maxslot.strip()), rows)
        except ValueError:
            raise UsageError("the rotation files (slot, maxslot, history) are malformed") \
                from None
