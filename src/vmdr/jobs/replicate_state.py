"""A replica's state at the DR site, and the pure decisions of a replica cycle.

The state is a small JSON file, ``replica.json``, in the standby's directory at the
target, next to the standby disks: it survives the loss of the source site, and
``vmdr replicate status`` reads it from there. It records the standby domain (name, new
UUID), the feed, the replica's own checkpoint on the source (direct feed) or the
repository snapshot applied last (repository feed), the restore points kept, and the
last cycles (bytes moved, duration, error).

Restore points are **qcow2 internal snapshots** of every standby disk, named
``rp-<UTC time>`` (see docs/operations.md, "Hot site: replicas", for why not external
overlays). The standby's current content always equals its newest point, unless a cycle
was interrupted while writing (``writing`` is then true: fail over to the newest point,
which is untouched).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import IntegrityError, UnsupportedFormat

STATE_FILE = "replica.json"
STATE_FORMAT = 1
CHUNK = 4 << 20  # the largest write of a cycle, and the repository feed's unit
MAX_CYCLES = 50  # cycles remembered in the state

# SLA states, in Zerto's sense
INITIALIZING = "initializing"  # no restore point at the target yet
MEETING = "meeting-sla"  # the newest point is younger than the RPO target
NOT_MEETING = "not-meeting-sla"  # older than the RPO target (cycles failing or too slow)
NO_TARGET = "no-rpo-target"  # replicating, but no RPO target is set


def replica_prefix(target_uri: str, directory: str) -> str:
    """The source-side checkpoint prefix of one replica (``vmdr-replica-<12 hex>``).

    Backups name their checkpoints ``vmdr-<repository id>``; the two prefixes never match
    each other's names (:func:`vmdr.hypervisor.is_ours`), so a replica cycle never deletes
    or reuses a backup checkpoint, and a backup never touches the replica's."""
    key = target_uri.split("?", 1)[0] + "\0" + directory.rstrip("/")
    return "vmdr-replica-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def point_name(when: datetime) -> str:
    """``rp-20261206T020304Z``: one restore point (a qcow2 internal snapshot tag)."""
    return f"rp-{when:%Y%m%dT%H%M%S}Z"


@dataclass
class RestorePoint:
    name: str  # the internal snapshot tag, the same on every disk
    time: str  # ISO UTC: the source's state at this instant (checkpoint or snapshot time)
    feed: str  # direct | repository
    mode: str  # seed | incremental | full
    bytes_moved: int = 0
    checkpoint: str | None = None  # direct feed: the source checkpoint it matches
    snapshot: str | None = None  # repository feed: the snapshot it matches


@dataclass
class Cycle:
    started: str
    duration_s: float
    feed: str
    mode: str  # seed | incremental | full | none (nothing new)
    bytes_moved: int = 0
    bytes_zeroed: int = 0
    point: str | None = None
    error: str | None = None


@dataclass
class ReplicaState:
    vm: str
    source_uri: str  # without its query (no key file names)
    source_uuid: str
    standby: str
    standby_uuid: str
    target_uri: str
    directory: str
    prefix: str  # the replica's checkpoint prefix on the source
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> path, size
    checkpoint: str | None = None  # direct feed: the source checkpoint of the newest point
    checkpoint_xml: str | None = None  # to redefine it if the source's libvirt lost it
    snapshot: str | None = None  # repository feed: the snapshot of the newest point
    repository: str | None = None  # its repository id
    feed: str = "direct"
    points: list[RestorePoint] = field(default_factory=list)  # oldest first
    cycles: list[Cycle] = field(default_factory=list)  # oldest first
    keep: int = 3
    rpo_target_s: float | None = None
    writing: bool = False  # a cycle was writing; the current content may be torn
    network_map: dict[str, str] = field(default_factory=dict)

    @property
    def newest(self) -> RestorePoint | None:
        return self.points[-1] if self.points else None

    def add_cycle(self, c: Cycle) -> None:
        self.cycles = [*self.cycles, c][-MAX_CYCLES:]

    def to_json(self) -> bytes:
        doc = {"format": STATE_FORMAT, **asdict(self)}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ReplicaState:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            fmt = doc.pop("format", None)
            if fmt != STATE_FORMAT:
                raise UnsupportedFormat(f"{where}: replica state format {fmt!r} (this vmdr "
                                        f"reads {STATE_FORMAT})")
            doc["points"] = [RestorePoint(**p) for p in doc.get("points", [])]
            doc["cycles"] = [Cycle(**c) for c in doc.get("cycles", [])]
            return cls(**doc)
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{where}: unreadable replica state ({exc})") from None


def to_rotate(points: Sequence[RestorePoint], keep: int) -> list[RestorePoint]:
    """The oldest points beyond the newest ``keep`` (``keep`` ≥ 1: the newest stays)."""
    keep = max(1, keep)
    return list(points[: max(0, len(points) - keep)])


def unique_point(name: str, existing: Iterable[str]) -> str:
    """``name``, or ``name-1``, ``name-2``… if a point of that name exists (two cycles in
    one second)."""
    taken = set(existing)
    out, n = name, 1
    while out in taken:
        out, n = f"{name}-{n}", n + 1
    return out


def sla(state: ReplicaState | None, now: datetime) -> tuple[str, float | None]:
    """(SLA state, achieved RPO in seconds: the newest point's age)."""
    if state is None or state.newest is None:
        return INITIALIZING, None
    age = max(0.0, (now - datetime.fromisoformat(state.newest.time)).total_seconds())
    if state.rpo_target_s is None:
        return NO_TARGET, age
    return (MEETING if age <= state.rpo_target_s else NOT_MEETING), age


def pieces(extents: Iterable[tuple[int, int]], limit: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Split ``(offset, length)`` ranges into writes of at most ``limit`` bytes."""
    for off, ln in extents:
        end = off + ln
        while off < end:
            n = min(limit, end - off)
            yield off, n
            off += n


def changed_chunks(old: Sequence[bytes] | None, new: Sequence[bytes]) -> list[int]:
    """Repository feed: the chunk indexes whose ID differs from the standby's (all of them
    when the standby's IDs are unknown)."""
    if old is None or len(old) != len(new):
        return list(range(len(new)))
    return [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]


def parse_network_map(items: Iterable[str]) -> dict[str, str]:
    """``SRC=DST`` pairs (CLI ``--network-map``) as a dict; ValueError names a bad one."""
    out: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"bad network mapping {item!r} (use SOURCE=DR, e.g. "
                             "default=dr-net)")
        out[src.strip()] = dst.strip()
    return out
