"""Summaries of py-spy ``record --idle --threads -f raw`` profiles for bench/vm_backup.py.

Each line of a raw profile is ``thread (TID): NAME;frame;frame;... COUNT``; with ``--idle``
every thread is sampled whether it runs or waits, so a thread's sample count is its wall
time × the sampling rate, and shares within a thread say where its wall time went.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


@dataclass
class Stack:
    tid: str
    name: str
    frames: list[str]
    count: int


def load(path: Path) -> list[Stack]:
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        m = re.match(r"thread \((\w+)\)(?::\s*(.*))?", frames[0])
        tid, name = (m.group(1), m.group(2) or "") if m else (frames[0], "")
        out.append(Stack(tid, name, frames[1:], int(n)))
    # a thread is sampled before and after it got its name: give every sample the name
    names = {s.tid: s.name for s in out if s.name}
    for s in out:
        s.name = names.get(s.tid, s.name)
    return out


def source_line(frame: str, src_root: Path) -> str:
    m = FRAME_RE.match(frame)
    if not m:
        return ""
    path = src_root / m.group("file")
    try:
        return path.read_text().splitlines()[int(m.group("line")) - 1].strip()
    except (OSError, IndexError):
        return ""


def threads(stacks: list[Stack], pred: Callable[[Stack], bool]) -> list[Stack]:
    """Stacks of the matching threads that lived for most of the command (short-lived
    pools, e.g. the boot disk's, would dilute the per-thread figures)."""
    per: collections.Counter[str] = collections.Counter()
    for s in stacks:
        if pred(s):
            per[s.tid] += s.count
    top = max(per.values(), default=0)
    tids = {t for t, n in per.items() if n >= top / 2}
    return [s for s in stacks if s.tid in tids]


def categorize(stacks: list[Stack], cats: list[tuple[str, list[str]]]) -> list[tuple[str, int]]:
    """First category whose pattern occurs anywhere in the stack; else 'other'."""
    c: collections.Counter[str] = collections.Counter()
    for s in stacks:
        text = ";".join(s.frames)
        for label, pats in cats:
            if any(p in text for p in pats):
                c[label] += s.count
                break
        else:
            c["other"] += s.count
    return c.most_common()


def leaves(stacks: list[Stack], src_root: Path, top: int = 6) -> list[tuple[str, int]]:
    """Leaf frames with their source line (what the thread was doing or waiting in)."""
    c: collections.Counter[str] = collections.Counter()
    for s in stacks:
        leaf = s.frames[-1] if s.frames else "?"
        if "concurrent/futures/thread.py" in leaf and "_worker" in leaf:
            c["idle: waiting for work (`_worker`)"] += s.count
            continue
        code = source_line(leaf, src_root)
        c[f"`{leaf}`" + (f": `{code}`" if code else "")] += s.count
    items = c.most_common()
    rest = sum(n for _, n in items[top:])
    return items[:top] + ([("other", rest)] if rest else [])


def table(rows: list[tuple[str, int]], rate: int, nthreads: int = 1) -> list[str]:
    total = sum(n for _, n in rows) or 1
    out = ["| where | thread time | share |", "|---|---|---|"]
    for label, n in rows:
        cell = label.replace("|", "\\|")  # a pipe inside a table cell
        out.append(f"| {cell} | {n / rate / nthreads:.2f} s"
                   f"{' per thread' if nthreads > 1 else ''} | {n / total * 100:.0f} % |")
    return out


MAIN_CATS = [
    ("Python start-up: importing modules", ["importlib._bootstrap"]),
    ("argon2id key derivation (opening the repository)", ["hash_secret_raw"]),
    ("guest agent: fsfreeze/thaw", ["_freeze", "_thaw", "hypervisor/agent.py"]),
    ("libvirt `backupBegin` (pull job + new checkpoint)", ["backupBegin"]),
    ("libvirt: end job, delete old checkpoint, leftovers check",
     ["_abort_job", "abort_backup_job", "jobStats", "delete_others", "checkpoints.py",
      "cleanup_leftovers", "hypervisor/cleanup.py"]),
    ("waiting for the disk threads (NBD read → chunk workers)", ["Future.result"]),
    ("restore: writing the qcow2 through qemu-nbd (`NBD.pwrite`)", ["NBD.pwrite"]),
    ("restore: waiting for fetched chunks", ["iter_chunks"]),
    ("libvirt connect, domain lookup, XML", ["libvirt.py", "hypervisor/domain.py",
                                             "hypervisor/connection.py", "hypervisor/xml.py"]),
    ("saving the snapshot, cache", ["save_snapshot", "manifest.py", "repository/cache.py"]),
    ("opening the repository (other)", ["repository/repo.py", "repository/keys.py",
                                        "storage/"]),
]


def summarize(profiles: dict[str, Path], src_root: Path, rate: int) -> list[str]:
    """Markdown: where vmdr's wall time goes in a full backup, an incremental, a restore."""
    md: list[str] = []
    full = profiles.get("full")
    if full and full.exists():
        st = load(full)
        ingest = [s for s in st if any("diskcopy.py" in f and f.startswith("ingest")
                                       for f in s.frames)]
        by_tid: collections.Counter[str] = collections.Counter()
        for s in ingest:
            by_tid[s.tid] += s.count
        if by_tid:
            tid = by_tid.most_common(1)[0][0]  # the data disk's reading thread
            rows = categorize([s for s in st if s.tid == tid], [
                ("waiting for the NBD read of the next 4 MiB (`NbdReader.read` → "
                 "`NBD.pread`, one request at a time)", ["NbdReader.read"]),
                ("blocked: every chunk slot is busy (`DiskWriter._submit` → "
                 "`Semaphore.acquire`, workers saturated)", ["Semaphore.acquire"]),
                ("block-status (extents)", ["extents"]),
            ])
            md += ["**Full backup — the thread that reads vdb** (it feeds the chunk workers):",
                   "", *table(rows, rate), ""]
        workers = threads(st, lambda s: s.name.startswith("vmdr-chunk"))
        nw = len({s.tid for s in workers}) or 1
        if workers:
            md += [f"**Full backup — chunk workers** ({nw} threads; hash, compress, encrypt, "
                   "write each 4 MiB chunk):", "", *table(leaves(workers, src_root), rate, nw),
                   ""]
    for kind, title in (("inc", "Incremental — main thread"),
                        ("restore", "Restore to qcow2 — main thread")):
        p = profiles.get(kind)
        if not (p and p.exists()):
            continue
        st = load(p)
        main_tid = next((s.tid for s in st if s.name == "MainThread"), None)
        rows = categorize([s for s in st if s.tid == main_tid], MAIN_CATS)
        md += [f"**{title}** (whole command, start-up included):", "", *table(rows, rate), ""]
        if kind == "restore":
            readers = threads(st, lambda s: s.name.startswith("vmdr-read"))
            nr = len({s.tid for s in readers}) or 1
            if readers:
                md += [f"**Restore — chunk fetch threads** ({nr} threads; read, decrypt, "
                       "decompress):", "", *table(leaves(readers, src_root, 4), rate, nr), ""]
    return md
