"""The bad-input table over the real CLI: every case fails with its documented exit code,
one line of error and no traceback, and changes nothing it should not.

The cases live in ``cases.toml`` (data, so the agent, HA, hot-site and tape issues extend
it). The selected cases run concurrently once per session; each test checks one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .cli import assert_clean_failure
from .table import Case, Outcome, load_cases, run_many
from .world import World

CASES = load_cases()


def _param(c: Case) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.fixture(scope="session")
def outcomes(request: pytest.FixtureRequest, world: World,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    selected = {item.callspec.id for item in request.session.items
                if isinstance(item, pytest.Function) and item.originalname == "test_case"
                and hasattr(item, "callspec")}
    base = tmp_path_factory.mktemp("cases")
    todo = [(c, base / f"c{i}") for i, c in enumerate(CASES) if c.id in selected]
    return run_many(world, todo)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case(case: Case, outcomes: dict[str, Outcome], world: World) -> None:
    out = outcomes[case.id]
    res = out.result
    assert_clean_failure(res, case.exit, strict_one_line=not case.ok_lines)
    if case.err:
        err = world.fill(case.err, Path("/nonexistent"))
        assert re.search(err, res.stderr, re.I), f"stderr lacks /{err}/\n" + res.describe()
    if "--json" in case.argv and res.stdout.strip():
        json.loads(res.stdout)  # stdout stays machine-readable even when the command fails
    for s in case.absent:
        assert s not in res.stdout + res.stderr, f"{s!r} was printed\n" + res.describe()
    assert not out.changed, "a failed command changed things:\n" + "\n".join(out.changed) \
        + "\n" + res.describe()


def test_table_is_large_and_documented() -> None:
    """The table keeps growing; every exit code in it is a documented failure code."""
    assert len(CASES) >= 200
    groups = {c.id.split("-", 1)[0] for c in CASES}
    assert {"global", "repo", "key", "image", "forget", "prune", "check", "copy", "backup",
            "restore", "plan"} <= groups
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for code in {c.exit for c in CASES}:
        assert re.search(rf"^\| {code} \|", readme, re.M), f"exit {code} not in README"
