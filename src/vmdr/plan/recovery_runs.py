"""Run reports of recovery plans: every ``vmdr failover`` / ``vmdr failback`` writes one.

A report is ``<reports>/<run>.json`` (the record) and ``<reports>/<run>.html`` (the same,
for people: SRM's "recovery plan history"), with each test VM's screenshot next to them
(``<run>-<vm>.png``). The run id is ``<UTC time>-<plan>-<kind>``, so the directory lists in
time order. The DR plan reads the newest test and planned runs of each plan from here: the
measured RTO and the "last tested" line of its run book.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from vmdr.errors import UsageError
from vmdr.templating import environment

KINDS = ("test", "planned", "unplanned", "failback")
RUN_RE = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9_.-]+-(test|planned|unplanned|failback)$")


@dataclass
class Step:
    name: str
    started: str
    duration_s: float = 0.0
    status: str = "ok"  # ok | failed | skipped
    vm: str | None = None
    detail: str = ""


@dataclass
class VMOutcome:
    vm: str
    outcome: str = "pending"  # ready | failed | skipped | pending | rolled-back
    group: int = 1
    point: str | None = None  # the restore point brought up
    point_time: str | None = None
    rpo_s: float | None = None  # age of that point when the run started (data lost)
    rto_s: float | None = None  # run start to this VM's readiness
    ready: str = ""
    ready_s: float | None = None  # start of the VM to its readiness
    records_note: str = ""
    screenshot: str | None = None  # file name next to the report
    error: str | None = None
    addresses: list[str] = field(default_factory=list)  # after re-IP


@dataclass
class RunReport:
    run: str
    plan: str
    kind: str
    started: str
    finished: str | None = None
    duration_s: float = 0.0
    outcome: str = "running"  # passed | failed | running
    error: str | None = None
    dr_hosts: list[str] = field(default_factory=list)
    forced: bool = False
    steps: list[Step] = field(default_factory=list)
    vms: list[VMOutcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def rto_s(self) -> float | None:
        vals = [v.rto_s for v in self.vms if v.rto_s is not None]
        return max(vals) if vals and all(v.outcome == "ready" for v in self.vms) else None

    def vm(self, name: str) -> VMOutcome:
        return next(v for v in self.vms if v.vm == name)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rto_s"] = self.rto_s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunReport:
        d = dict(d)
        d.pop("rto_s", None)
        d["steps"] = [Step(**s) for s in d.get("steps", [])]
        d["vms"] = [VMOutcome(**v) for v in d.get("vms", [])]
        return cls(**d)


def run_id(when: datetime, plan: str, kind: str) -> str:
    return f"{when:%Y%m%dT%H%M%S}Z-{plan}-{kind}"


def write(directory: str, rep: RunReport) -> tuple[str, str]:
    """Write ``<run>.json`` and ``<run>.html`` (0644 in a 0755 directory); their paths."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    base = os.path.join(directory, rep.run)
    js = base + ".json"
    tmp = js + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rep.as_dict(), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, js)
    html = base + ".html"
    with open(html + ".tmp", "w", encoding="utf-8") as f:
        f.write(render_html(rep))
    os.replace(html + ".tmp", html)
    return js, html


def render_html(rep: RunReport) -> str:
    env = environment("vmdr.plan")
    return env.get_template("recovery_run.html").render(
        title=f"Recovery plan {rep.plan}: {rep.kind} run {rep.run}", r=rep, rto=rep.rto_s)


def list_runs(directory: str, plan: str | None = None) -> list[RunReport]:
    """Every readable report, oldest first (unreadable files are skipped)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not n.endswith(".json") or not RUN_RE.match(n[:-5]):
            continue
        try:
            with open(os.path.join(directory, n), encoding="utf-8") as f:
                rep = RunReport.from_dict(json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if plan is None or rep.plan == plan:
            out.append(rep)
    return out


def load_run(directory: str, run: str) -> RunReport:
    """One report by its run id, or by a unique prefix / suffix of it (UsageError)."""
    runs = list_runs(directory)
    exact = [r for r in runs if r.run == run]
    hits = exact or [r for r in runs if r.run.startswith(run) or r.run.endswith(run)]
    if len(hits) != 1:
        what = "no run" if not hits else f"{len(hits)} runs"
        raise UsageError(f"{what} matching {run!r} in {directory} (`vmdr failover report` "
                         "lists them)")
    return hits[0]


def last_run(directory: str, plan: str, kinds: tuple[str, ...]) -> RunReport | None:
    done = [r for r in list_runs(directory, plan) if r.kind in kinds and r.outcome != "running"]
    return done[-1] if done else None
