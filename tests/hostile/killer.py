"""``kill -9`` a real vmdr process at a chosen moment, and read what it left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cli import VMDR, Result, run_vmdr


@dataclass
class Kill:
    at: str          # the kill point, for messages
    landed: bool     # the process was still running when it was killed


def run_and_kill(argv: list[str], env: dict[str, str], when: Callable[[float], bool],
                 at: str, cwd: str | None = None, timeout: float = 60.0) -> Kill:
    """Start vmdr; poll ``when(elapsed_s)`` every ~2 ms; when true, SIGKILL the whole
    process group (vmdr and any qemu-img/qemu-nbd child) at once."""
    p = subprocess.Popen([*VMDR, *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.monotonic()
    try:
        while p.poll() is None:
            elapsed = time.monotonic() - t0
            if elapsed > timeout:
                raise AssertionError(f"vmdr {' '.join(argv)} ran over {timeout}s")
            if when(elapsed):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return Kill(at, True)
            time.sleep(0.002)
        return Kill(at, False)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def after(seconds: float) -> Callable[[float], bool]:
    return lambda elapsed: elapsed >= seconds


def count_files(d: Path) -> int:
    n = 0
    for _root, _dirs, files in os.walk(d):
        n += len(files)
    return n


def when_files(d: Path, pred: Callable[[int], bool]) -> Callable[[float], bool]:
    return lambda _elapsed: pred(count_files(d))


def when_allocated(d: Path, nbytes: int) -> Callable[[float], bool]:
    """True once the files in *d* have *nbytes* allocated (restores write sparse files,
    so their size says nothing)."""
    def check(_elapsed: float) -> bool:
        total = 0
        for p in d.iterdir() if d.exists() else ():
            try:
                total += p.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        return total >= nbytes
    return check


def check_problems(env: dict[str, str], *extra: str) -> tuple[Result, list[dict[str, str]]]:
    """Run ``vmdr check --json`` and return its problems."""
    res = run_vmdr(["check", "--json", *extra], env)
    assert "Traceback" not in res.stderr, res.describe()
    assert res.code in (0, 6), res.describe()
    return res, json.loads(res.stdout)["problems"]


def assert_only_stale_temps(env: dict[str, str], what: str, *extra: str) -> None:
    """After a kill, `check` finds nothing, or only stale temporary objects."""
    res, problems = check_problems(env, *extra)
    bad = [p for p in problems if p["kind"] != "stale-temp"]
    assert not bad, f"after {what}: check found {bad}\n{res.describe()}"
