"""Read-only views the API and dashboard share: snapshots, repositories, plan coverage.

Like jobs, these run ``vmdr … --json`` as subprocesses (opening a repository costs a KDF
and may hang on a dead remote; neither may stall the agent) and cache the answer briefly.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

from vmdr.agent.runner import VMDR, _repo_args
from vmdr.config import Config
from vmdr.storage.registry import redact

if TYPE_CHECKING:
    from vmdr.agent.daemon import Agent

_cache: dict[tuple[str, ...], tuple[float, Any, str | None]] = {}
_lock = threading.Lock()
TTL = 30.0


_refreshing: set[tuple[str, ...]] = set()


def run_json(cfg: Config, args: list[str], timeout: float = 60.0, ttl: float = TTL,
             stale_ok: bool = False) -> tuple[Any, str | None]:
    """(parsed stdout, None) or (None, the one-line error) of ``vmdr --json ARGS``.

    ``stale_ok``: an answer past its *ttl* is returned at once while a thread asks again
    (a page never waits for a subprocess it has an answer for)."""
    key = (cfg.path or "", *args)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit and now - hit[0] < ttl:
            return hit[1], hit[2]
        if hit and stale_ok:
            if key not in _refreshing:
                _refreshing.add(key)
                threading.Thread(target=_refresh, args=(cfg, args, timeout, key),
                                 daemon=True).start()
            return hit[1], hit[2]
    return _run(cfg, args, timeout, key)


def _refresh(cfg: Config, args: list[str], timeout: float, key: tuple[str, ...]) -> None:
    try:
        _run(cfg, args, timeout, key)
    finally:
        with _lock:
            _refreshing.discard(key)


def _run(cfg: Config, args: list[str], timeout: float,
         key: tuple[str, ...]) -> tuple[Any, str | None]:
    now = time.monotonic()
    argv = [*VMDR, "--json", "--no-progress"]
    data: Any = None
    err: str | None = None
    if cfg.path:
        argv += ["--config", cfg.path]
    try:
        p = subprocess.run(argv + args, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        data, err = None, f"timed out after {timeout:.0f}s"
    else:
        if p.returncode == 0:
            try:
                data, err = json.loads(p.stdout), None
            except ValueError:
                data, err = None, "unreadable output"
        else:
            lines = [x for x in p.stderr.splitlines() if x.startswith("vmdr: error:")]
            data = None
            err = (lines[-1].removeprefix("vmdr: error: ") if lines
                   else f"exit code {p.returncode}")
    with _lock:
        _cache[key] = (now, data, err)
    return data, err


def snapshots(cfg: Config, repo: str, vm: str) -> tuple[list[dict[str, Any]], str | None]:
    ref = cfg.repositories[repo]
    data, err = run_json(cfg, [*_repo_args(ref), "snapshots", vm])
    return (data if isinstance(data, list) else []), err


def repo_stats(cfg: Config, repo: str) -> tuple[dict[str, Any] | None, str | None]:
    ref = cfg.repositories[repo]
    data, err = run_json(cfg, [*_repo_args(ref), "repo", "stats"], ttl=300)
    return (data if isinstance(data, dict) else None), err


def repositories(a: Agent) -> list[dict[str, Any]]:
    out = []
    since = a.clock() - 30 * 86400
    for name, ref in sorted(a.cfg.repositories.items()):
        growth = [{"time": r["time"], "stored_bytes": r["stored_bytes"],
                   "snapshots": r["snapshots"]} for r in a.history.repo_stats(name, since)]
        last = growth[-1] if growth else None
        out.append({"name": name, "url": redact(ref.url),
                    "stored_bytes": last["stored_bytes"] if last else None,
                    "snapshots": last["snapshots"] if last else None,
                    "growth": growth,
                    "policies": sorted(n for n, p in a.cfg.policies.items()
                                       if p.repository == name or name in p.copy)})
    return out


def plan_coverage(cfg: Config) -> tuple[dict[str, Any] | None, str | None]:
    """The plan's coverage as data: VM × disaster level (``vmdr plan coverage --json``)."""
    data, err = run_json(cfg, ["plan", "coverage", "--offline"], timeout=120, ttl=300,
                         stale_ok=True)
    return (data if isinstance(data, dict) else None), err


def plan_markdown(cfg: Config) -> tuple[str | None, str | None]:
    argv = [*VMDR, "--no-progress"] + (["--config", cfg.path] if cfg.path else [])
    try:
        p = subprocess.run([*argv, "plan", "write", "--format", "md", "--offline"],
                           capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    if p.returncode != 0:
        lines = [x for x in p.stderr.splitlines() if x.startswith("vmdr: error:")]
        return None, lines[-1].removeprefix("vmdr: error: ") if lines else "plan failed"
    return p.stdout, None
