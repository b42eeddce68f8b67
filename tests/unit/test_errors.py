"""The exception tree: every vmdr error lives in errors.py, is drawn in its tree with its
exit code, and every exit code is documented; SIGTERM and SIGHUP end any command like
Ctrl-C does."""

from __future__ import annotations

import inspect
import os
import re
import signal
from pathlib import Path

from vmdr import errors

from .test_passphrase_tty import Terminal

SRC = Path(__file__).resolve().parents[2] / "src" / "vmdr"
README = Path(__file__).resolve().parents[2] / "README.md"
CLASSES = {n: c for n, c in vars(errors).items()
           if inspect.isclass(c) and issubclass(c, errors.VmdrError)}


def test_every_error_class_is_defined_in_errors_py() -> None:
    names = set(CLASSES)
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py" and path.parent == SRC:
            continue
        for cls, bases in re.findall(r"^\s*class (\w+)\(([^)]*)\)", path.read_text(), re.M):
            found = {b.strip().rpartition(".")[2] for b in bases.split(",")}
            assert not found & names, f"{path}: {cls} belongs in vmdr/errors.py"


def _tree() -> dict[str, tuple[int, int, str | None]]:
    """name -> (exit code, depth, parent) from the drawing in errors.py's docstring."""
    out: dict[str, tuple[int, int, str | None]] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*(?:[│├└─]\s*)*)(\w+)\s+exit (\d+)", line)
        if not m:
            continue
        depth = len(m.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        out[m.group(2)] = (int(m.group(3)), depth, stack[-1][1] if stack else None)
        stack.append((depth, m.group(2)))
    return out


def test_the_drawn_tree_shows_every_class_with_its_exit_code() -> None:
    tree = _tree()
    for name, cls in CLASSES.items():
        assert name in tree, f"{name} is missing from the tree in errors.py"
        code, _, parent = tree[name]
        assert code == cls.exit_code, name
        if cls is not errors.VmdrError:
            assert parent == cls.__mro__[1].__name__, f"{name} drawn under {parent}"


def test_every_exit_code_is_documented_once() -> None:
    codes = dict(errors.EXIT_CODES)
    assert {c.exit_code for c in CLASSES.values()} <= set(codes)
    assert len(codes) == len(errors.EXIT_CODES)
    table = set(re.findall(r"^\| (\d+) \|", README.read_text(), re.M))
    assert table == {str(c) for c in codes}, "README's exit-code table"
    assert errors.MigrationStopped.exit_code not in {
        c.exit_code for n, c in CLASSES.items() if n != "MigrationStopped"}


def test_sighup_ends_a_command_like_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VMDR_PASSWORD",
                                                            "VMDR_PASSWORD_FILE")}
    from .repofixtures import make_repo

    make_repo(str(tmp_path / "r")).close()
    term = Terminal(["snapshots"], {**env, "VMDR_REPO": str(tmp_path / "r")})
    term.expect("Repository passphrase:")  # blocked, reading the terminal
    os.kill(term.pid, signal.SIGHUP)
    assert term.wait() == errors.EXIT_INTERRUPTED, term.seen
    assert "vmdr: interrupted" in term.seen
