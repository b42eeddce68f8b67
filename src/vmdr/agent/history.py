"""Job history, one schema for SQLite (one host, embedded) and PostgreSQL (a fleet).

SQLAlchemy Core only: the same tables and queries run on both. Times are UNIX seconds
(float) so both engines sort and compare them the same way.

Tables: ``jobs`` (one row per job), ``events`` (the job's JSON event stream), ``logs`` (its
plain stderr lines), ``schedule_state`` (the last calendar time each schedule handled — the
compare-and-set point that keeps a schedule from running twice), ``tokens`` and ``users``
(hashes only), ``alerts`` (open/resolved, for de-duplication) and ``repo_stats`` (stored bytes
over time, for the growth chart).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine

from vmdr.agent.clock import stamp, wall
from vmdr.errors import UsageError

meta = sa.MetaData()

jobs_t = sa.Table(
    "jobs", meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("vm", sa.String(255)),
    sa.Column("policy", sa.String(255)),
    sa.Column("repository", sa.String(255)),
    sa.Column("host", sa.String(255)),
    sa.Column("state", sa.String(16), nullable=False),  # queued running ok failed interrupted
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("scheduled_for", sa.Float),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("exit_code", sa.Integer),
    sa.Column("error", sa.Text),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("snapshot", sa.String(128)),
    sa.Column("pid", sa.Integer),
    sa.Column("requested_by", sa.String(255)),
    sa.Column("args", sa.Text),  # JSON: the job's parameters (never secrets)
    sa.Column("result", sa.Text),  # JSON: the end event's result
    sa.Index("ix_jobs_created", "created", "id"),  # the listing's ORDER BY, no sort step
    sa.Index("ix_jobs_vm_type_state", "vm", "type", "state", "ended"),
    sa.Index("ix_jobs_state_created", "state", "created", "id"),  # failed/running, newest
)
events_t = sa.Table(
    "events", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_events_job", "job_id", "id"),
)
logs_t = sa.Table(
    "logs", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("line", sa.Text, nullable=False),
    sa.Index("ix_logs_job", "job_id", "id"),
)
schedule_t = sa.Table(
    "schedule_state", meta,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("last_due", sa.Float, nullable=False),
)
# the newest successful job per (VM, type): the protection table reads this, not the jobs
vm_last_t = sa.Table(
    "vm_last", meta,
    sa.Column("vm", sa.String(255), primary_key=True),
    sa.Column("type", sa.String(16), primary_key=True),
    sa.Column("ended", sa.Float, nullable=False),
    sa.Column("job_id", sa.String(32), nullable=False),
)
tokens_t = sa.Table(
    "tokens", meta,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("hash", sa.String(128), nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("expires", sa.Float),
)
users_t = sa.Table(
    "users", meta,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
alerts_t = sa.Table(
    "alerts", meta,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # firing | resolved
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("first", sa.Float, nullable=False),
    sa.Column("last", sa.Float, nullable=False),
)
repo_stats_t = sa.Table(
    "repo_stats", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("repository", sa.String(255), nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("stored_bytes", sa.BigInteger, nullable=False),
    sa.Column("snapshots", sa.Integer, nullable=False),
    sa.Index("ix_repo_stats", "repository", "time"),
)

FINISHED = ("ok", "failed", "interrupted")


@dataclass
class Job:
    id: str
    type: str  # backup | restore | verify | copy | prune
    vm: str | None
    state: str
    created: float
    policy: str | None = None
    repository: str | None = None
    host: str | None = None
    scheduled_for: float | None = None
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    error: str | None = None
    bytes: int | None = None
    snapshot: str | None = None
    pid: int | None = None
    requested_by: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in _JOB_FIELDS}  # shallow: asdict() deep-copies
        d["duration_s"] = (round(self.ended - self.started, 3)
                           if self.ended and self.started else None)
        return d


_JOB_FIELDS = tuple(f.name for f in fields(Job))


def new_job_id() -> str:
    return stamp(wall()) + "-" + secrets.token_hex(4)


def _row_job(r: Any) -> Job:
    m = r._mapping
    return Job(
        id=m["id"], type=m["type"], vm=m["vm"], state=m["state"], created=m["created"],
        policy=m["policy"], repository=m["repository"], host=m["host"],
        scheduled_for=m["scheduled_for"], started=m["started"], ended=m["ended"],
        exit_code=m["exit_code"], error=m["error"], bytes=m["bytes"], snapshot=m["snapshot"],
        pid=m["pid"], requested_by=m["requested_by"],
        args=json.loads(m["args"]) if m["args"] else {},
        result=json.loads(m["result"]) if m["result"] else None,
    )


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


class History:
    """The job history. Every method is one short transaction; safe from several threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            # a file opened by every API thread: keep enough connections open that none is
            # opened (and its pragmas run) per request; no pre-ping, a file does not drop
            self.engine: Engine = sa.create_engine(url, pool_size=8, max_overflow=24)
            sa_event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8,
                                           max_overflow=8)
        meta.create_all(self.engine)
        for t in meta.sorted_tables:  # indexes added since the tables were made
            for ix in t.indexes:
                ix.create(self.engine, checkfirst=True)
        self._version = 0
        self._version_lock = threading.Lock()

    @property
    def version(self) -> int:
        """Bumped by every write of this process to jobs or vm_last: a cache of a listing
        is current while this is unchanged (other agents of a fleet write too: see
        :attr:`shared`)."""
        return self._version

    @property
    def shared(self) -> bool:
        """Other processes write this history (PostgreSQL: the fleet's agents)."""
        return self.dialect != "sqlite"

    def _changed(self) -> None:
        with self._version_lock:
            self._version += 1

    @classmethod
    def open(cls, state: str, database: str | None = None) -> History:
        """PostgreSQL when *database* is given, else the SQLite file *state* (0600)."""
        if database:
            url = database.replace("postgresql://", "postgresql+psycopg://", 1)
            return cls(url)
        d = os.path.dirname(os.path.abspath(state))
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            if not os.path.exists(state):
                os.close(os.open(state, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise UsageError(f"agent state {state}: {exc.strerror}") from None
        return cls(f"sqlite:///{os.path.abspath(state)}")

    @property
    def dialect(self) -> str:
        return str(self.engine.dialect.name)

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ---------------------------------------------------------------------------
    def add_job(self, job: Job) -> bool:
        """Insert *job*; False if a job with its id exists (a re-fired schedule)."""
        d = asdict(job)
        d["args"] = json.dumps(job.args)
        d["result"] = json.dumps(job.result) if job.result is not None else None
        try:
            with self.engine.begin() as c:
                c.execute(jobs_t.insert().values(**d))
        except sa.exc.IntegrityError:
            return False
        self._changed()
        return True

    def update_job(self, job_id: str, **values: Any) -> None:
        if "result" in values and values["result"] is not None:
            values["result"] = json.dumps(values["result"])
        with self.engine.begin() as c:
            c.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(**values))
        self._changed()

    def start_job(self, job_id: str, pid: int, started: float) -> bool:
        """queued → running; False if the job is no longer queued (someone else took it)."""
        with self.engine.begin() as c:
            r = c.execute(jobs_t.update()
                          .where(jobs_t.c.id == job_id, jobs_t.c.state == "queued")
                          .values(state="running", pid=pid, started=started))
        self._changed()
        return bool(r.rowcount)

    def job(self, job_id: str) -> Job | None:
        with self.engine.connect() as c:
            r = c.execute(jobs_t.select().where(jobs_t.c.id == job_id)).first()
        return _row_job(r) if r else None

    def jobs_by_id(self, ids: Sequence[str]) -> dict[str, Job]:
        """The jobs of *ids* that exist, in one query per 500 ids."""
        out: dict[str, Job] = {}
        with self.engine.connect() as c:
            for i in range(0, len(ids), 500):
                q = jobs_t.select().where(jobs_t.c.id.in_(list(ids[i:i + 500])))
                out.update((j.id, j) for j in map(_row_job, c.execute(q)))
        return out

    def jobs(self, limit: int = 100, offset: int = 0, vm: str | None = None,
             state: str | None = None, type_: str | None = None,
             host: str | None = None, before: str | None = None) -> list[Job]:
        """The newest jobs first. Page with *before* (the last id of the previous page):
        a keyset walk of the (created, id) index that costs the same on page 1 and
        page 2,000; *offset* stays for small jumps. An unknown *before* gives []."""
        q = jobs_t.select()
        if before is not None:
            with self.engine.connect() as c:
                at = c.execute(sa.select(jobs_t.c.created).where(jobs_t.c.id == before)).first()
            if at is None:
                return []
            # a row-value comparison: both engines seek the index with it (an OR does not)
            q = q.where(sa.tuple_(jobs_t.c.created, jobs_t.c.id)
                        < sa.tuple_(sa.literal(at[0]), sa.literal(before)))
        if vm:
            q = q.where(jobs_t.c.vm == vm)
        if state:
            q = q.where(jobs_t.c.state == state)
        if type_:
            q = q.where(jobs_t.c.type == type_)
        if host:
            q = q.where(jobs_t.c.host == host)
        q = q.order_by(jobs_t.c.created.desc(), jobs_t.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as c:
            return [_row_job(r) for r in c.execute(q)]

    def active_jobs(self, host: str | None = None) -> list[Job]:
        q = jobs_t.select().where(jobs_t.c.state.in_(("queued", "running")))
        if host:
            q = q.where(jobs_t.c.host == host)
        with self.engine.connect() as c:
            return [_row_job(r) for r in c.execute(q.order_by(jobs_t.c.created))]

    def mark_interrupted(self, host: str | None, now: float) -> list[str]:
        """Jobs left running by an agent that died: ``interrupted`` (queued ones stay)."""
        q = jobs_t.select().where(jobs_t.c.state == "running")
        if host:
            q = q.where(jobs_t.c.host == host)
        with self.engine.begin() as c:
            ids = [r._mapping["id"] for r in c.execute(q)]
            if ids:
                c.execute(jobs_t.update().where(jobs_t.c.id.in_(ids)).values(
                    state="interrupted", ended=now,
                    error="the agent stopped while the job ran"))
        self._changed()
        return ids

    def last_success(self, type_: str) -> dict[str, tuple[float, str | None]]:
        """VM → (end time, job id) of its newest successful job of *type_*."""
        q = (sa.select(vm_last_t.c.vm, vm_last_t.c.ended, vm_last_t.c.job_id)
             .where(vm_last_t.c.type == type_))
        with self.engine.connect() as c:
            return {r[0]: (r[1], r[2]) for r in c.execute(q)}

    def record_success(self, vm: str, type_: str, ended: float, job_id: str) -> None:
        """Keep vm_last current (called when a job ends ok); newer ends win."""
        for _ in range(3):
            with self.engine.begin() as c:
                r = c.execute(vm_last_t.update()
                              .where(vm_last_t.c.vm == vm, vm_last_t.c.type == type_,
                                     vm_last_t.c.ended < ended)
                              .values(ended=ended, job_id=job_id))
                if r.rowcount:
                    self._changed()
                    return
                exists = c.execute(sa.select(vm_last_t.c.ended).where(
                    vm_last_t.c.vm == vm, vm_last_t.c.type == type_)).first()
                if exists is not None:
                    return  # a newer one is recorded
            try:
                with self.engine.begin() as c:
                    c.execute(vm_last_t.insert().values(vm=vm, type=type_, ended=ended,
                                                        job_id=job_id))
                self._changed()
                return
            except sa.exc.IntegrityError:
                continue  # another agent inserted it first: compare again

    def last_job(self, vm: str, type_: str, state: str | None = "ok") -> Job | None:
        q = jobs_t.select().where(jobs_t.c.vm == vm, jobs_t.c.type == type_)
        if state:
            q = q.where(jobs_t.c.state == state)
        with self.engine.connect() as c:
            r = c.execute(q.order_by(jobs_t.c.created.desc()).limit(1)).first()
        return _row_job(r) if r else None

    def durations(self) -> Iterator[tuple[str, str, float]]:
        """(type, outcome, seconds) of every finished job: the duration histogram."""
        q = (sa.select(jobs_t.c.type, jobs_t.c.state, jobs_t.c.started, jobs_t.c.ended)
             .where(jobs_t.c.state.in_(FINISHED), jobs_t.c.started.is_not(None),
                    jobs_t.c.ended.is_not(None)))
        with self.engine.connect() as c:
            for t, s, a, b in c.execute(q):
                yield t, s, max(0.0, b - a)

    def count_running(self) -> int:
        q = sa.select(sa.func.count()).select_from(jobs_t).where(jobs_t.c.state == "running")
        with self.engine.connect() as c:
            return int(c.execute(q).scalar() or 0)

    # -- events and logs ----------------------------------------------------------------
    def add_event(self, job_id: str, ev: dict[str, Any], now: float) -> None:
        with self.engine.begin() as c:
            c.execute(events_t.insert().values(job_id=job_id, time=now,
                                               type=str(ev.get("type", "?"))[:16],
                                               data=json.dumps(ev)))

    def add_log(self, job_id: str, line: str, now: float) -> None:
        with self.engine.begin() as c:
            c.execute(logs_t.insert().values(job_id=job_id, time=now, line=line))

    def events(self, job_id: str, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        q = (sa.select(events_t.c.id, events_t.c.data)
             .where(events_t.c.job_id == job_id, events_t.c.id > after).order_by(events_t.c.id))
        with self.engine.connect() as c:
            return [(r[0], json.loads(r[1])) for r in c.execute(q)]

    def logs(self, job_id: str) -> list[tuple[float, str]]:
        q = (sa.select(logs_t.c.time, logs_t.c.line).where(logs_t.c.job_id == job_id)
             .order_by(logs_t.c.id))
        with self.engine.connect() as c:
            return [(r[0], r[1]) for r in c.execute(q)]

    # -- schedules ----------------------------------------------------------------------
    def schedule_state(self) -> dict[str, float]:
        with self.engine.connect() as c:
            return {r[0]: r[1] for r in c.execute(sa.select(schedule_t.c.key,
                                                            schedule_t.c.last_due))}

    def advance_schedule(self, key: str, expected: float | None, new: float) -> bool:
        """Compare-and-set *key* from *expected* (None: absent) to *new*; False if another
        agent moved it first."""
        with self.engine.begin() as c:
            if expected is None:
                try:
                    with c.begin_nested():
                        c.execute(schedule_t.insert().values(key=key, last_due=new))
                    return True
                except sa.exc.IntegrityError:
                    return False
            r = c.execute(schedule_t.update()
                          .where(schedule_t.c.key == key, schedule_t.c.last_due == expected)
                          .values(last_due=new))
            return bool(r.rowcount)

    # -- tokens, users --------------------------------------------------------------------
    def add_token(self, tid: str, name: str, role: str, digest: str, now: float,
                  expires: float | None = None) -> None:
        with self.engine.begin() as c:
            c.execute(tokens_t.insert().values(id=tid, name=name, role=role, hash=digest,
                                               created=now, expires=expires))

    def token_by_hash(self, digest: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(tokens_t.select().where(tokens_t.c.hash == digest)).first()
        return dict(r._mapping) if r else None

    def tokens(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            return [{k: v for k, v in r._mapping.items() if k != "hash"}
                    for r in c.execute(tokens_t.select().order_by(tokens_t.c.created))]

    def delete_token(self, tid: str) -> bool:
        with self.engine.begin() as c:
            return bool(c.execute(tokens_t.delete().where(tokens_t.c.id == tid)).rowcount)

    def set_user(self, name: str, role: str, digest: str, now: float) -> None:
        with self.engine.begin() as c:
            c.execute(users_t.delete().where(users_t.c.name == name))
            c.execute(users_t.insert().values(name=name, role=role, hash=digest, created=now))

    def user(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as c:
            r = c.execute(users_t.select().where(users_t.c.name == name)).first()
        return dict(r._mapping) if r else None

    # -- alerts ---------------------------------------------------------------------------
    def alert_state(self, key: str) -> str | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(alerts_t.c.state).where(alerts_t.c.key == key)).first()
        return str(r[0]) if r else None

    def set_alert(self, key: str, kind: str, state: str, message: str, now: float) -> None:
        with self.engine.begin() as c:
            r = c.execute(alerts_t.update().where(alerts_t.c.key == key)
                          .values(state=state, message=message, last=now))
            if not r.rowcount:
                c.execute(alerts_t.insert().values(key=key, kind=kind, state=state,
                                                   message=message, first=now, last=now))

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        q = alerts_t.select()
        if state:
            q = q.where(alerts_t.c.state == state)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q.order_by(alerts_t.c.last.desc()))]

    # -- repository growth ----------------------------------------------------------------
    def add_repo_stat(self, repo: str, now: float, stored: int, snapshots: int) -> None:
        with self.engine.begin() as c:
            c.execute(repo_stats_t.insert().values(repository=repo, time=now,
                                                   stored_bytes=stored, snapshots=snapshots))

    def repo_stats(self, repo: str | None = None,
                   since: float = 0.0) -> list[dict[str, Any]]:
        q = repo_stats_t.select().where(repo_stats_t.c.time >= since)
        if repo:
            q = q.where(repo_stats_t.c.repository == repo)
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q.order_by(repo_stats_t.c.time))]

    def repo_stats_latest(self) -> list[tuple[str, int]]:
        """(repository, stored bytes) of each repository's newest measurement."""
        newest = (sa.select(repo_stats_t.c.repository, sa.func.max(repo_stats_t.c.id).label("m"))
                  .group_by(repo_stats_t.c.repository).subquery())
        q = (sa.select(repo_stats_t.c.repository, repo_stats_t.c.stored_bytes)
             .join(newest, repo_stats_t.c.id == newest.c.m).order_by(repo_stats_t.c.repository))
        with self.engine.connect() as c:
            return [(r[0], int(r[1])) for r in c.execute(q)]

    # -- retention ------------------------------------------------------------------------
    def expire(self, before: float) -> int:
        """Delete finished jobs that ended before *before*, with their events and logs."""
        with self.engine.begin() as c:
            ids = sa.select(jobs_t.c.id).where(jobs_t.c.state.in_(FINISHED),
                                              jobs_t.c.ended < before)
            c.execute(events_t.delete().where(events_t.c.job_id.in_(ids)))
            c.execute(logs_t.delete().where(logs_t.c.job_id.in_(ids)))
            n = c.execute(jobs_t.delete().where(jobs_t.c.state.in_(FINISHED),
                                                jobs_t.c.ended < before)).rowcount
            c.execute(repo_stats_t.delete().where(repo_stats_t.c.time < before))
        if n:
            self._changed()
        return int(n or 0)

    def bulk_jobs(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert many job rows at once (benchmarks and migrations), vm_last included."""
        with self.engine.begin() as c:
            c.execute(jobs_t.insert(), list(rows))
        self._changed()
        newest: dict[tuple[str, str], tuple[float, str]] = {}
        for r in rows:
            if r.get("state") == "ok" and r.get("vm") and r.get("ended"):
                k = (r["vm"], r["type"])
                if k not in newest or newest[k][0] < r["ended"]:
                    newest[k] = (r["ended"], r["id"])
        for (vm, t), (ended, jid) in newest.items():
            self.record_success(vm, t, ended, jid)
