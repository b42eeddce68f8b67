"""The bad-input table (``cases.toml``) and its runner.

Each case is one real ``vmdr`` run: argv (with ``{placeholders}`` from
:class:`~tests.hostile.world.World`), an environment preset plus overrides, optional
config and files written into the case's own directory, and the expected exit code.
Every case must then fail cleanly (:func:`~tests.hostile.cli.assert_clean_failure`) and,
unless it says ``mutates = true``, leave every repository, the case directory and the
VM lock directory exactly as they were.
"""

from __future__ import annotations

import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import DOCUMENTED_CODES, Result, clean_env, run_vmdr
from .world import REPOS, World, fingerprint

CASES_FILE = Path(__file__).with_name("cases.toml")
_FIELDS = {"id", "argv", "exit", "preset", "env", "unset", "config", "files", "modes",
           "err", "absent", "mutates", "xfail", "harden", "timeout", "ok_lines"}


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    exit: int
    preset: str = "repo"
    env: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    config: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    err: str | None = None          # a substring stderr must contain (case-insensitive)
    absent: list[str] = field(default_factory=list)  # never in stdout or stderr
    mutates: bool = False
    xfail: str | None = None        # a known bug not fixed yet (strict xfail)
    harden: str | None = None       # the issue-14 item this case checks (for the report)
    timeout: float = 30.0
    ok_lines: bool = False          # vmdr: warning: lines may precede the error


def load_cases(path: Path = CASES_FILE) -> list[Case]:
    doc = tomllib.loads(path.read_text())
    out: list[Case] = []
    seen: set[str] = set()
    for group, table in doc.items():
        for raw in table["cases"]:
            unknown = set(raw) - _FIELDS
            if unknown:
                raise ValueError(f"{group}: unknown case fields {sorted(unknown)}")
            c = Case(**{**raw, "id": f"{group}-{raw['id']}"})
            if c.id in seen:
                raise ValueError(f"duplicate case id {c.id}")
            if c.exit not in DOCUMENTED_CODES - {0}:
                raise ValueError(f"{c.id}: exit {c.exit} is not a documented failure code")
            seen.add(c.id)
            out.append(c)
    return out


@dataclass
class Outcome:
    result: Result
    changed: list[str]      # what a non-mutating case changed (should be empty)


def _snapshot_state(case_dir: Path) -> dict[str, dict[str, tuple[int, str]]]:
    state = {r: fingerprint(case_dir / r) for r in REPOS}
    state["case-dir"] = {p.name: (0, "") for p in case_dir.iterdir()
                         if p.name not in {*REPOS, "cache", "vmlocks"}}
    state["vmlocks"] = fingerprint(case_dir / "vmlocks")
    return state


def run_case(world: World, case: Case, case_dir: Path) -> Outcome:
    case_dir.mkdir(parents=True)
    world.stage(case_dir)
    env = world.env(case_dir, case.preset)
    for name, content in case.files.items():
        p = case_dir / name
        p.write_text(world.fill(content, case_dir))
        p.chmod(int(case.modes.get(name, "0600"), 8))
    if case.config is not None:
        cfg = case_dir / "vmdr.toml"
        cfg.write_text(world.fill(case.config, case_dir))
        env["VMDR_CONFIG"] = str(cfg)
    env.update({k: world.fill(v, case_dir) for k, v in case.env.items()})
    for k in case.unset:
        env.pop(k, None)
    argv = [world.fill(a, case_dir) for a in case.argv]
    before = _snapshot_state(case_dir)
    res = run_vmdr(argv, clean_env(env), cwd=str(case_dir), timeout=case.timeout)
    changed: list[str] = []
    if not case.mutates:
        after = _snapshot_state(case_dir)
        for area, files in after.items():
            old = before[area]
            for name in sorted(set(files) | set(old)):
                if files.get(name) != old.get(name):
                    what = ("created" if name not in old else "deleted" if name not in files
                            else "modified")
                    changed.append(f"{area}: {what} {name}")
    return Outcome(res, changed)


def run_many(world: World, cases: list[tuple[Case, Path]], workers: int = 3
             ) -> dict[str, Outcome]:
    with ThreadPoolExecutor(workers) as pool:
        futs = {c.id: pool.submit(run_case, world, c, d) for c, d in cases}
        return {k: f.result() for k, f in futs.items()}


def describe(case: Case) -> dict[str, Any]:
    return {"id": case.id, "exit": case.exit, "harden": case.harden, "xfail": case.xfail}
