"""Helpers for bench/run.py: the test image, timed commands, statistics and the doc section."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GNU_TIME = "/usr/bin/time"
MiB, GiB = 1 << 20, 1 << 30
SOURCE_TREES = ("/usr/lib", "/usr/share")
RANDOM_SEED = 20261125


# ------------------------------------------------------------------ the image
@dataclass
class ImageInfo:
    path: Path
    size: int
    files_bytes: int
    random_bytes: int
    allocated_bytes: int
    trees: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.size / GiB:.0f} GiB ext4 image ({self.allocated_bytes / GiB:.2f} GiB "
                f"allocated): {self.files_bytes / 1e9:.2f} GB of files copied from "
                f"{' and '.join(SOURCE_TREES)} plus a {self.random_bytes / MiB:.0f} MiB file "
                "of seeded pseudo-random bytes, built with `mke2fs -t ext4 -d` (no mount)")


def _du_bytes(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def build_image(work: Path, size: int, files_budget: int, random_size: int) -> ImageInfo:
    """Build (or reuse) ``work/image-<size>.raw``; the source tree is removed afterwards."""
    img = work / f"image-{size // GiB}g.raw"
    meta = img.with_suffix(".json")
    if img.exists() and meta.exists():
        d = json.loads(meta.read_text())
        return ImageInfo(img, size, d["files_bytes"], d["random_bytes"], allocated_bytes(img),
                         d["trees"])
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"src-{size // GiB}g"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    # Every top-level entry of /usr/lib and /usr/share, smallest first; skip what does not
    # fit the budget, so the image holds many small files and several big library trees.
    entries = [(_du_bytes(str(p)), str(p)) for tree in SOURCE_TREES
               for p in sorted(Path(tree).iterdir())]
    used, taken = 0, []
    for nbytes, path in sorted(entries):
        if used + nbytes > files_budget:
            continue
        dest = src / Path(path).parent.name / Path(path).name
        dest.parent.mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", path, str(dest)], check=True)
        used += nbytes
        taken.append(path)
    rng = random.Random(RANDOM_SEED)
    with open(src / "random.bin", "wb") as f:
        left = random_size
        while left:
            n = min(left, 16 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    tmp = img.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "vmdr-bench", "-d", str(src),
                    str(tmp), f"{size // 1024}k"], check=True)  # no suffix = blocks
    tmp.rename(img)
    shutil.rmtree(src)
    meta.write_text(json.dumps({"files_bytes": used, "random_bytes": random_size,
                                "trees": taken}, indent=1))
    return ImageInfo(img, size, used, random_size, allocated_bytes(img), taken)


# ------------------------------------------------------------------ running things
@dataclass
class Timed:
    wall: float
    rss_kb: int
    stdout: str
    cpu: float = 0.0  # user + system seconds of the process and its children


class CommandFailed(RuntimeError):
    pass


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache, so every timed run reads cold."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> Timed:
    """Run *cmd* under GNU time: wall seconds, peak RSS (KB) of the largest process, CPU."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.monotonic()
        p = subprocess.run([GNU_TIME, "-f", "%e %M %U %S", "-o", tf.name, *cmd], env=env, cwd=cwd,
                           capture_output=True, text=True)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise CommandFailed(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        fields = tf.read().split()[-4:]  # after any "Command exited ..." line
    return Timed(wall, int(fields[1]), p.stdout, float(fields[2]) + float(fields[3]))


def run(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    p = subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under *path* (what ``du -sb`` reports)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


# ------------------------------------------------------------------ statistics
@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, unit: str = "s", scale: float = 1.0, digits: int = 1) -> str:
        if not self.values:
            return "–"
        med = f"{self.median / scale:.{digits}f}"
        if len(self.values) == 1:
            return f"{med} {unit}"
        lo, hi = min(self.values) / scale, max(self.values) / scale
        return f"{med} {unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def ratio(a: Series, b: Series) -> float | None:
    if not a.values or not b.values or b.median == 0:
        return None
    return a.median / b.median


def paired_ratio(a: Series, b: Series) -> float | None:
    """Median of the per-round ratios a[i]/b[i] (rounds ran both back to back, so slow
    phases of a shared machine cancel); the ratio of medians if the series do not pair."""
    if len(a.values) != len(b.values) or not a.values or 0 in b.values:
        return ratio(a, b)
    return statistics.median(x / y for x, y in zip(a.values, b.values))


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in rows)])


# ------------------------------------------------------------------ machine, versions, doc
def machine() -> str:
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / GiB:.1f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def tree_digest(path: Path) -> str:
    """A short SHA-256 over the names and contents of the ``.py`` files under *path*."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*.py")):
        h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def versions(repo_root: Path, vmdr: str, env: dict[str, str] | None = None) -> dict[str, str]:
    def first(cmd: list[str]) -> str:
        try:
            return run(cmd, env if cmd[0] == vmdr else None).strip().splitlines()[0]
        except (CommandFailed, OSError, IndexError):
            return "?"

    git = ["git", "-C", str(repo_root)]
    rev = first([*git, "rev-parse", "--short", "HEAD"])
    dirty = ", uncommitted changes" if first([*git, "status", "--porcelain"]) != "?" else ""
    return {"vmdr": f"{first([vmdr, '--version'])} (git {rev}{dirty})",
            "borg": first(["borg", "--version"]), "restic": first(["restic", "version"])}


def replace_section(doc: Path, name: str, body: str, title: str) -> None:
    """Write *body* between ``<!-- bench:NAME:start/end -->``, keeping other sections."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else f"# {title}\n\n"
    pat = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _m: block, text) if pat.search(text) else text.rstrip() + f"\n\n{block}\n"
    doc.write_text(text)
