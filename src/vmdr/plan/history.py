"""What the repositories hold, as plain records: VM snapshots and their verifications.

Each declared repository is opened read-only (no lock, nothing written to it) through an
*opener* the caller supplies, with a deadline. A repository that cannot be opened is
reported with its error; when a cache file holds an earlier reading of it, those records
are used instead and marked stale with their age.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import VmdrError
from vmdr.plan.inventory import Inventory, RepoDecl
from vmdr.repository.repo import Repository
from vmdr.timeutil import format_time, parse_time

Opener = Callable[[RepoDecl], Repository]


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


def read_repository(repo: Repository, name: str) -> list[Copy]:
    # one listing tells which snapshots have attachments at all (most have none), so a
    # remote repository is not asked once per snapshot
    attached = {o.name.split("/")[1] for o in repo.backend.list("attachments")
                if o.name.count("/") >= 2}
    out = []
    for s in repo.list_snapshots():
        if s.meta.get("kind") != "vm":
            continue
        cfg = s.meta.get("config") or {}
        vers = []
        if s.id in attached:
            vers = [_verification(a) for a in repo.attachments(s.id, "verification")]
        mem = cfg.get("memory_kib")
        out.append(Copy(
            name, s.name, s.id, s.time, sum(d.size for d in s.disks),
            int(cfg["vcpus"]) if isinstance(cfg.get("vcpus"), int) else None,
            int(mem) * 1024 if isinstance(mem, int) else None,
            tuple((d.name, d.size) for d in s.disks), tuple(vers)))
    return out


def _num(doc: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = doc.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def _verification(a: dict[str, Any]) -> Verification:
    nbytes = _num(a, "bytes_written", "restore_bytes")
    beat = _num(a, "heartbeat_s", "boot_s")
    boot = bool(a["boot"]) if "boot" in a else beat is not None
    return Verification(parse_time(str(a["time"])), str(a.get("status", "failed")), beat,
                        _num(a, "restore_s"), int(nbytes) if nbytes is not None else None, boot)


def load(inv: Inventory, opener: Opener, now: datetime, timeout: float = 30.0,
         cached: dict[str, Any] | None = None) -> dict[str, RepoState]:
    """Read every declared repository (in parallel, each within *timeout* seconds)."""
    results: dict[str, RepoState] = {}
    threads = []

    def work(decl: RepoDecl) -> None:
        try:
            with opener(decl) as repo:
                copies = read_repository(repo, decl.name)
            results[decl.name] = RepoState(decl.name, True, now, None, copies)
        except VmdrError as exc:
            results[decl.name] = RepoState(decl.name, False, None, exc.message)
        except Exception as exc:  # any library failure means: unreachable for the plan
            results[decl.name] = RepoState(decl.name, False, None,
                                           f"{type(exc).__name__}: {exc}")

    for decl in inv.repositories.values():
        th = threading.Thread(target=work, args=(decl,), daemon=True)
        th.start()
        threads.append((decl.name, th))
    for name, th in threads:
        th.join(timeout)
        if name not in results:
            results[name] = RepoState(name, False, None, f"no answer within {timeout:.0f}s")
    for name, st in results.items():
        if not st.reachable and cached and name in cached:
            st.read_at, st.copies = from_cache(cached[name])
    return {n: results[n] for n in inv.repositories}


def to_cache(state: RepoState) -> dict[str, Any]:
    def copy_doc(c: Copy) -> dict[str, Any]:
        d = asdict(c)
        d["time"] = format_time(c.time)
        d["verifications"] = [{**asdict(v), "time": format_time(v.time)}
                              for v in c.verifications]
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
            copies.append(Copy(c["repo"], c["vm"], c["snapshot"], parse_time(c["time"]),
                               int(c["size"]), c.get("vcpus"), c.get("memory"),
                               tuple((str(n), int(s)) for n, s in c.get("disks", [])), vers))
        return read_at, copies
    except (KeyError, TypeError, ValueError):
        return None, []
