"""Every job runs as its own ``vmdr … --json-events`` process.

A job that crashes, hangs or is killed with ``kill -9`` cannot take the agent down: the
agent only reads the job's stderr (one JSON event per line, other lines are its log),
waits for its exit status and records the outcome. The job id travels in ``VMDR_JOB_ID``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmdr.agent.clock import wall
from vmdr.agent.history import History, Job
from vmdr.config import Config, RepositoryRef
from vmdr.storage.registry import redact

log = logging.getLogger("vmdr.agent")

VMDR = [sys.executable, "-m", "vmdr.cli.main"]
_MAX_LINE = 64 * 1024


@functools.cache
def json_events_supported() -> bool:
    """Whether this vmdr has the global ``--json-events`` (docs/events.md). Without it jobs
    still run: their outcome comes from the exit code and their ``--json`` output."""
    try:
        p = subprocess.run([*VMDR, "--help"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--json-events" in p.stdout


def _repo_args(ref: RepositoryRef) -> list[str]:
    args = ["--repo", ref.url]
    if ref.password_file:
        args += ["--password-file", ref.password_file]
    if ref.key_file:
        args += ["--key-file", ref.key_file]
    return args


def job_command(cfg: Config, job: Job) -> list[str]:
    """The argv of *job*. Only file names of secrets appear, never their contents."""
    a = job.args
    base = [*VMDR, *(["--json-events"] if json_events_supported() else []), "--json",
            "--no-progress"]
    if cfg.path:
        base += ["--config", cfg.path]
    if job.type == "replicate":
        return base + replicate_command(cfg, job)
    repo = cfg.repositories.get(job.repository or "")
    if repo is None:
        raise ValueError(f"job {job.id}: unknown repository {job.repository!r}")
    base += _repo_args(repo)
    pol = cfg.policies.get(job.policy or "")
    # the policy's bandwidth windows: the job follows them by the clock while it runs
    bw = ["--bwlimit", "; ".join(pol.bandwidth)] if pol and pol.bandwidth else []
    if job.type == "backup":
        cmd = ["backup", str(job.vm), "--mode", str(a.get("mode", "auto")), *bw]
        if cfg.connect:
            cmd += ["--connect", cfg.connect]
        return base + cmd
    if job.type == "verify":
        cmd = ["verify", f"{job.vm}@{a.get('snapshot') or 'latest'}"]
        if a.get("boot"):
            # the console screenshot lands where the dashboard shows it from
            evidence = os.path.join(os.path.dirname(os.path.abspath(cfg.agent.state)),
                                    "evidence", job.id)
            cmd += ["--boot", "--connect", cfg.connect, "--evidence-dir", evidence]
        return base + cmd
    if job.type == "copy":
        to = cfg.repositories[str(a["to"])]
        cmd = ["copy", str(job.vm), "--to", to.url, "--latest", "1", *bw]
        if to.password_file:
            cmd += ["--to-password-file", to.password_file]
        if to.key_file:
            cmd += ["--to-key-file", to.key_file]
        return base + cmd
    if job.type == "prune":
        cmd = ["forget", "--prune"]
        for k, n in dict(a.get("keep", {})).items():
            cmd += [f"--keep-{k}", str(n)]
        if a.get("keep_within"):
            cmd += ["--keep-within", str(a["keep_within"])]
        return base + cmd
    if job.type == "restore":
        cmd = ["restore", f"{job.vm}@{a.get('snapshot') or 'latest'}",
               "--target-dir", str(a["target_dir"])]
        if a.get("name"):
            cmd += ["--name", str(a["name"])]
        if a.get("define"):
            cmd += ["--define", "--connect", str(a.get("connect") or cfg.connect)]
        if a.get("start"):
            cmd += ["--start"]
        if a.get("force"):
            cmd += ["--force"]
        return base + cmd
    raise ValueError(f"job {job.id}: unknown type {job.type!r}")


def replicate_command(cfg: Config, job: Job) -> list[str]:
    """``replicate VM`` for a replicate policy: one cycle (snapshot), or a mirror that
    runs until it is aborted (``--exit-on-abort``: the agent alerts, then the policy's
    next firing restarts it, beginning with a snapshot cycle). The policy's bandwidth
    windows go as ``--bwlimit``: a cycle's changed pieces, a mirror's block jobs."""
    a = job.args
    cmd = ["replicate", str(job.vm), "--connect", cfg.connect]
    pol = cfg.policies.get(job.policy or "")
    if pol and pol.bandwidth:
        cmd += ["--bwlimit", "; ".join(pol.bandwidth)]
    if a.get("to"):
        cmd += ["--to", str(a["to"])]
    if isinstance(a.get("rpo"), int | float):
        cmd += ["--rpo", f"{int(float(str(a['rpo'])))}s"]
    mode = str(a.get("mode") or "snapshot")
    if mode in ("mirror", "sync"):
        cmd += ["--mode", mode, "--exit-on-abort"]
    else:
        cmd += ["--mode", "snapshot"]
    return cmd


@dataclass
class Outcome:
    state: str  # ok | failed
    exit_code: int | None
    error: str | None
    result: dict[str, Any] | None
    bytes: int | None
    snapshot: str | None


def _summary(result: dict[str, Any] | None) -> tuple[int | None, str | None]:
    """Bytes stored and snapshot id from an ``end`` event's result or ``--json`` output."""
    if not isinstance(result, dict):
        return None, None
    r = result
    if isinstance(r.get("results"), list) and r["results"]:
        r = r["results"][0] if isinstance(r["results"][0], dict) else r
    b = r.get("bytes_stored", r.get("bytes"))
    snap = r.get("snapshot") or r.get("snapshot_id")
    return (int(b) if isinstance(b, int | float) else None), (str(snap) if snap else None)


class Runner:
    """Runs jobs as subprocesses and records what they say. One per agent."""

    def __init__(self, history: History, command: Callable[[Job], list[str]],
                 clock: Callable[[], float] = wall) -> None:
        self.history, self.command, self.clock = history, command, clock
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.listeners: list[Callable[[Job], None]] = []

    async def run(self, job: Job) -> Job:
        """Start *job* (queued in the history), wait for it, record and return its end."""
        try:
            argv = self.command(job)
        except (ValueError, KeyError) as exc:
            self.history.update_job(job.id, state="failed", ended=self.clock(), error=str(exc))
            return self._finished(job.id)
        env = dict(os.environ, VMDR_JOB_ID=job.id, PYTHONUNBUFFERED="1")
        env.pop("VMDR_PASSWORD", None)  # jobs read password files named in the config
        log.info("job %s: starting %s %s", job.id, job.type, job.vm or "")
        log.debug("job %s: %s", job.id, " ".join(redact(a) for a in argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
                limit=_MAX_LINE)
        except OSError as exc:
            self.history.update_job(job.id, state="failed", ended=self.clock(),
                                    error=f"cannot start: {exc.strerror}")
            return self._finished(job.id)
        if not self.history.start_job(job.id, proc.pid, self.clock()):
            proc.kill()
            await proc.wait()
            return self._finished(job.id)
        self.procs[job.id] = proc
        try:
            end: dict[str, Any] = {}
            errors: list[str] = []
            out, _ = await asyncio.gather(self._stdout(proc), self._stderr(job.id, proc, end,
                                                                            errors))
            code = await proc.wait()
        finally:
            self.procs.pop(job.id, None)
        outcome = self._outcome(code, end, errors, out)
        ended = self.clock()
        self.history.update_job(job.id, state=outcome.state, ended=ended,
                                exit_code=outcome.exit_code, error=outcome.error,
                                result=outcome.result, bytes=outcome.bytes,
                                snapshot=outcome.snapshot)
        if outcome.state == "ok" and job.vm:
            self.history.record_success(job.vm, job.type, ended, job.id)
        log.info("job %s: %s %s %s%s", job.id, job.type, job.vm or "", outcome.state,
                 f": {outcome.error}" if outcome.error else "")
        return self._finished(job.id)

    def _finished(self, job_id: str) -> Job:
        j = self.history.job(job_id)
        assert j is not None
        for f in self.listeners:
            try:
                f(j)
            except Exception:  # a listener (alerts, metrics) must not break the runner
                log.exception("job listener failed")
        return j

    async def _stdout(self, proc: asyncio.subprocess.Process) -> bytes:
        assert proc.stdout is not None
        chunks = []
        total = 0
        while chunk := await proc.stdout.read(65536):
            if total < 4 << 20:
                chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    async def _stderr(self, job_id: str, proc: asyncio.subprocess.Process,
                      end: dict[str, Any], errors: list[str]) -> None:
        assert proc.stderr is not None
        while True:
            try:
                raw = await proc.stderr.readline()
            except ValueError:  # a line longer than the limit: skip it
                await proc.stderr.read(_MAX_LINE)
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                continue
            now = self.clock()
            ev = _event(line)
            if ev is None:
                self.history.add_log(job_id, line, now)
                if line.startswith("vmdr: error:") or line.startswith("vmdr: internal error"):
                    errors.append(line.split(":", 2)[2].strip())
                continue
            self.history.add_event(job_id, ev, now)
            if ev.get("type") == "end":
                end.update(ev)
            elif ev.get("type") == "error":
                errors.append(str(ev.get("message", ev.get("error", "error"))))

    def _outcome(self, code: int, end: dict[str, Any], errors: list[str],
                 out: bytes) -> Outcome:
        result: dict[str, Any] | None = None
        if isinstance(end.get("result"), dict):
            result = end["result"]
        else:
            with contextlib.suppress(ValueError):
                parsed = json.loads(out.decode("utf-8", "replace")) if out.strip() else None
                result = parsed if isinstance(parsed, dict) else None
        nbytes, snap = _summary(result)
        if code < 0:
            return Outcome("failed", code, f"killed by signal {signal.Signals(-code).name}",
                           result, nbytes, snap)
        outcome = str(end.get("outcome", "ok" if code == 0 else "failed"))
        if code == 0 and outcome in ("ok", "success", "succeeded"):
            return Outcome("ok", 0, None, result, nbytes, snap)
        err = (str(end["message"]) if end.get("message") else errors[-1] if errors
               else f"exit code {code}")
        if code == 0:  # exit 0 but not ok: e.g. a "partial" outcome
            err = f"{outcome}: {err}"
        return Outcome("failed", code, err, result, nbytes, snap)

    def cancel(self, job_id: str) -> bool:
        proc = self.procs.get(job_id)
        if proc is None or proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        return True

    async def stop_all(self, grace: float = 30.0) -> None:
        """SIGTERM every job (they clean up and exit 130), SIGKILL after *grace*."""
        procs = list(self.procs.values())
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                                            timeout=grace)
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)


def _event(line: str) -> dict[str, Any] | None:
    """The JSON event on *line*, or None for a plain log line (parsed defensively)."""
    if not line.startswith("{"):
        return None
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
        return None
    return ev
