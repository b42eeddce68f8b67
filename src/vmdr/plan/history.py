"""What the repositories hold, as plain records: VM snapshots, their verifications and the
restores made from them.

Pure data: the plan job (``jobs/plan.py``) reads the repositories and turns each
attachment document into a :class:`Verification` or :class:`Restore` with
:func:`from_attachments`. :func:`to_cache` and :func:`from_cache` convert a reading to and
from the JSON of the plan's cache file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vmdr.timeutil import format_time, parse_time


@dataclass(frozen=True)
class Verification:
    time: datetime
    status: str  # "passed" | "failed"
    heartbeat_s: float | None = None
    restore_s: float | None = None
    restore_bytes: int | None = None
    boot: bool = True  # False: a data-only verification (no test boot)

    @property
    def boot_passed(self) -> bool:
        return self.boot and self.status == "passed"


@dataclass(frozen=True)
class Restore:
    """One ``vmdr restore`` of the snapshot (its ``kind = "restore"`` attachment)."""

    time: datetime
    size: int | None  # virtual size of the disks restored
    bytes_written: int | None  # non-zero data written (restores are sparse)
    restore_s: float | None  # disks and config, without define and boot
    heartbeat_s: float | None = None  # from start to heartbeat; None: not booted
    target: str | None = None  # host name or libvirt URI
    format: str | None = None
    # False: made from another repository and brought here by ``vmdr copy``, so its time
    # says nothing about restoring from this one
    same_repo: bool = True

    @property
    def throughput(self) -> float | None:
        """Virtual bytes restored per second from this repository (the rate RTO estimates
        divide disk sizes by), or None."""
        if not self.same_repo:
            return None
        nbytes = self.size if self.size else self.bytes_written
        if not nbytes or not self.restore_s or self.restore_s <= 0:
            return None
        return nbytes / self.restore_s


@dataclass(frozen=True)
class Copy:
    """One restorable VM snapshot in one repository."""

    repo: str
    vm: str
    snapshot: str  # full id
    time: datetime
    size: int  # sum of the disks' virtual sizes
    vcpus: int | None = None
    memory: int | None = None  # bytes
    disks: tuple[tuple[str, int], ...] = ()
    verifications: tuple[Verification, ...] = ()
    restores: tuple[Restore, ...] = ()

    @property
    def short_id(self) -> str:
        return self.snapshot[:8]

    def last_verification(self) -> Verification | None:
        return self.verifications[-1] if self.verifications else None

    def last_passed(self) -> Verification | None:
        ok = [v for v in self.verifications if v.boot_passed]
        return ok[-1] if ok else None


@dataclass
class RepoState:
    name: str
    reachable: bool
    read_at: datetime | None  # when the copies were read (now, or the cache's time)
    error: str | None = None
    copies: list[Copy] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return not self.reachable and self.read_at is not None


def _num(doc: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = doc.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def _int(v: float | None) -> int | None:
    return None if v is None else int(v)


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def verification(a: dict[str, Any]) -> Verification:
    """A ``kind = "verification"`` attachment document as a record."""
    beat = _num(a, "heartbeat_s", "boot_s")
    boot = bool(a["boot"]) if "boot" in a else beat is not None
    return Verification(parse_time(str(a["time"])), str(a.get("status", "failed")), beat,
                        _num(a, "restore_s"), _int(_num(a, "bytes_written", "restore_bytes")),
                        boot)


def restore(a: dict[str, Any], repo_id: str | None = None) -> Restore:
    """A ``kind = "restore"`` attachment document as a record; read from the repository
    with ID *repo_id* (a record naming another ``repository`` was copied here)."""
    origin = a.get("repository")
    return Restore(parse_time(str(a["time"])), _int(_num(a, "size")),
                   _int(_num(a, "bytes_written")), _num(a, "restore_s"),
                   _num(a, "heartbeat_s"), _str(a.get("target")), _str(a.get("format")),
                   repo_id is None or origin is None or origin == repo_id)


def from_attachments(
    docs: Iterable[dict[str, Any]], repo_id: str | None = None,
) -> tuple[tuple[Verification, ...], tuple[Restore, ...]]:
    """The verifications and restores among a snapshot's attachments (others ignored),
    as read from the repository with ID *repo_id*."""
    vers, rests = [], []
    for a in docs:
        if a.get("kind") == "verification":
            vers.append(verification(a))
        elif a.get("kind") == "restore":
            rests.append(restore(a, repo_id))
    return tuple(vers), tuple(rests)


def to_cache(state: RepoState) -> dict[str, Any]:
    def timed(rec: Verification | Restore) -> dict[str, Any]:
        return {**asdict(rec), "time": format_time(rec.time)}

    def copy_doc(c: Copy) -> dict[str, Any]:
        d = asdict(c)
        d["time"] = format_time(c.time)
        d["verifications"] = [timed(v) for v in c.verifications]
        d["restores"] = [timed(r) for r in c.restores]
        return d
    return {"read_at": format_time(state.read_at) if state.read_at else None,
            "copies": [copy_doc(c) for c in state.copies]}


def from_cache(doc: dict[str, Any]) -> tuple[datetime | None, list[Copy]]:
    try:
        read_at = parse_time(doc["read_at"]) if doc.get("read_at") else None
        copies = []
        for c in doc.get("copies", []):
            vers = tuple(Verification(parse_time(v["time"]), v["status"], v.get("heartbeat_s"),
                                      v.get("restore_s"), v.get("restore_bytes"),
                                      bool(v.get("boot", True)))
                         for v in c.get("verifications", []))
            rests = tuple(Restore(parse_time(r["time"]), r.get("size"), r.get("bytes_written"),
                                  r.get("restore_s"), r.get("heartbeat_s"), r.get("target"),
                                  r.get("format"), bool(r.get("same_repo", True)))
                          for r in c.get("restores", []))
            copies.append(Copy(c["repo"], c["vm"], c["snapshot"], parse_time(c["time"]),
                               int(c["size"]), c.get("vcpus"), c.get("memory"),
                               tuple((str(n), int(s)) for n, s in c.get("disks", [])), vers,
                               rests))
        return read_at, copies
    except (KeyError, TypeError, ValueError):
        return None, []
