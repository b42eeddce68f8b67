"""The layering rule of docs/architecture.md, checked on the source, stated positively:
each package and top-level module lists the vmdr packages and modules it may import, and
every module under src/vmdr belongs to one of them.

Every module is parsed with ``ast``; every import counts, also inside functions and
under ``TYPE_CHECKING``, and so does ``importlib.import_module("…")`` with a literal name.
Imports within a package are always allowed.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vmdr"

BASE = frozenset({"errors", "timeutil"})
"""What everything may use: the exception tree and the one wall-clock reader."""
SUPPORT = BASE | {"procutil", "credentials"}

# unit (a package, or a top-level module by its name; "__init__" is vmdr/__init__.py) ->
# the units it may import
ALLOWED: dict[str, frozenset[str]] = {
    "__init__": frozenset(),
    "errors": frozenset(),
    "timeutil": frozenset(),
    "procutil": frozenset({"errors"}),
    "credentials": frozenset({"errors"}),
    "config": BASE | {"credentials"},
    "templating": frozenset(),                        # the HTML toolkit (Jinja2)
    # the bottom: bytes in and out
    "storage": SUPPORT,
    "diskio": SUPPORT,
    "fileaccess": SUPPORT | {"diskio"},
    "events": BASE,                                   # the typed job events
    "ui": BASE | {"events"},                          # renders events; imports no job
    # the middle: repositories, hypervisors, the estate, tape
    "repository": SUPPORT | {"storage"},
    "hypervisor": SUPPORT,
    "plan": BASE | {"config", "storage", "templating"},
    "tape": SUPPORT | {"config", "storage", "repository"},
    "ha": BASE | {"config", "plan", "events"},        # coming: pure decisions
    # block-level services over a repository and a hypervisor (NBD export, sandboxes):
    # used by jobs, never using them
    "serve": SUPPORT | {"storage", "repository", "hypervisor", "diskio"},
    # orchestration
    "jobs": SUPPORT | {"config", "storage", "diskio", "fileaccess", "repository",
                       "hypervisor", "plan", "tape", "serve", "events", "ui", "__init__"},
    "agent": SUPPORT | {"config", "storage", "diskio", "fileaccess", "repository",  # coming
                        "hypervisor", "plan", "tape", "ha", "serve", "events", "ui", "jobs",
                        "templating", "__init__"},
    "cli": SUPPORT | {"config", "storage", "diskio", "fileaccess", "repository",
                      "hypervisor", "plan", "tape", "ha", "serve", "events", "ui", "jobs",
                      "agent", "templating", "__init__"},
}
COMING = frozenset({"ha", "agent"})
"""Units with an entry before their code lands (issue 8 and the daemon issues)."""


def unit_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


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


def target_of(mod: str) -> str | None:
    """The unit an absolute import lands in (None: not vmdr); ``from vmdr import x`` with
    x not a package or module is a name from vmdr/__init__.py."""
    parts = mod.split(".")
    if parts[0] != "vmdr":
        return None
    if len(parts) > 1 and ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").is_file()):
        return parts[1]
    return "__init__"


def violations() -> list[str]:
    """"path:line: unit imports module" for every import its unit may not make."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        unit = unit_of(path)
        allowed = ALLOWED.get(unit, frozenset()) | {unit}
        for line, mod in imports(path):
            target = target_of(mod)
            if target is not None and target not in allowed:
                out.append(f"src/vmdr/{path.relative_to(SRC)}:{line}: {unit} imports {mod}")
    return out


def test_every_module_belongs_to_a_listed_unit() -> None:
    units = {unit_of(p) for p in SRC.rglob("*.py")}
    assert not units - set(ALLOWED), "add these to ALLOWED (docs/architecture.md)"
    assert set(ALLOWED) - units <= COMING, "listed but gone: remove from ALLOWED"


def test_imports_only_what_is_allowed() -> None:
    bad = violations()
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_the_layers_have_no_cycle() -> None:
    graphlib.TopologicalSorter(ALLOWED).static_order()  # raises CycleError


def test_the_scan_sees_imports() -> None:
    """A checker that finds nothing proves nothing: it resolves the forms in use."""
    found = {m for _, m in imports(SRC / "cli" / "plan_cmds.py")}
    assert "vmdr.jobs.plan" in found and "vmdr.plan.report" in found
    assert any(m.startswith("vmdr.hypervisor.") for _, m in imports(SRC / "jobs" / "plan.py"))
    assert "libvirt_qemu" in {m for _, m in imports(SRC / "hypervisor" / "_compat.py")}
    assert len(list(SRC.rglob("*.py"))) > 50
    assert target_of("vmdr.__version__") == "__init__"
    assert target_of("vmdr.repository.repo.Repository") == "repository"
    assert target_of("vmdr.timeutil.utcnow") == "timeutil" and target_of("os.path") is None


# The hypervisor boundary (issue 8 §2): only the driver package talks to libvirt.
LIBVIRT_MODULES = ("libvirt", "libvirt_qemu", "libvirtmod", "libvirtaio")
HYPERVISOR_PRIVATE = ("vmdr.hypervisor._compat", "vmdr.hypervisor.errors",
                      "vmdr.hypervisor.handles", "vmdr.hypervisor.connection")


def test_libvirt_is_imported_only_under_hypervisor() -> None:
    """No module outside src/vmdr/hypervisor/ imports the libvirt bindings, the lazy loader
    (``_compat``), the libvirtError translation or the libvirt driver's internals; they use
    the driver interface (``vmdr.hypervisor``) instead."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "hypervisor":
            continue
        for line, mod in imports(path):
            if mod.split(".")[0] in LIBVIRT_MODULES or any(
                    mod == p or mod.startswith(p + ".") for p in HYPERVISOR_PRIVATE):
                bad.append(f"src/vmdr/{rel}:{line}: imports {mod}")
    assert not bad, "libvirt outside the hypervisor package:\n" + "\n".join(bad)
    inside = {m for _, m in imports(SRC / "hypervisor" / "_compat.py")}
    assert "libvirt" in inside and "libvirt_qemu" in inside  # the scan sees both forms
