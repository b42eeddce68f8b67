"""The layering rule of docs/architecture.md, checked on the source: imports only go
downward (cli → jobs → repository / hypervisor / plan → storage), never sideways.

Every module under src/vmdr is parsed with ``ast``; every import counts, also inside
functions and under ``TYPE_CHECKING``, and so does ``importlib.import_module("…")`` with a
literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vmdr"

# package -> the vmdr packages it must not import from
FORBIDDEN: dict[str, frozenset[str]] = {
    "storage": frozenset({"repository", "hypervisor", "plan", "jobs", "cli", "serve",
                          "fileaccess", "agent"}),
    "repository": frozenset({"hypervisor", "plan", "jobs", "cli", "serve", "agent"}),
    "hypervisor": frozenset({"repository", "plan", "jobs", "cli", "agent"}),
    "plan": frozenset({"repository", "hypervisor", "jobs", "cli", "agent"}),
    "jobs": frozenset({"cli", "agent"}),
    # serve and fileaccess sit at the jobs level
    "serve": frozenset({"cli", "agent"}),
    "fileaccess": frozenset({"cli", "agent"}),
    # the agent sits above jobs and runs them as `vmdr` processes; it never imports the CLI
    "agent": frozenset({"cli"}),
}

# Known violations, each "path under src/vmdr: imported module", to be fixed by the
# module's owner (then remove the entry: test_known_exceptions_still_exist insists).
# None today.
KNOWN: frozenset[str] = frozenset()


def module_name(path: Path) -> str:
    parts = ("vmdr", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module) for every import in *path*; ``from a import b`` gives
    ``a.b`` (b may be a module or a name in a)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def violations() -> dict[str, str]:
    """"path: module" -> "path:line: package imports module" for every forbidden import."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        forbidden = FORBIDDEN.get(rel.parts[0], frozenset()) if len(rel.parts) > 1 else set()
        for line, mod in imports(path):
            parts = mod.split(".")
            if parts[0] == "vmdr" and len(parts) > 1 and parts[1] in forbidden:
                out.setdefault(f"{rel}: {mod}", f"src/vmdr/{rel}:{line}: {rel.parts[0]} "
                                                f"imports {mod}")
    return out


def test_imports_only_go_downward() -> None:
    new = [v for k, v in violations().items() if k not in KNOWN]
    assert not new, "imports against the layering (docs/architecture.md):\n" + "\n".join(new)


def test_known_exceptions_still_exist() -> None:
    assert not KNOWN - set(violations()), "fixed: remove from KNOWN"


def test_the_scan_sees_imports() -> None:
    """A checker that finds nothing proves nothing: it resolves the forms in use."""
    found = {m for _, m in imports(SRC / "cli" / "plan_cmds.py")}
    assert "vmdr.jobs.plan" in found and "vmdr.plan.report" in found
    assert any(m.startswith("vmdr.hypervisor.") for _, m in imports(SRC / "jobs" / "plan.py"))
    assert "libvirt_qemu" in {m for _, m in imports(SRC / "hypervisor" / "_compat.py")}
    assert len(list(SRC.rglob("*.py"))) > 50
