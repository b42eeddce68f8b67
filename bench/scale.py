"""Scale benchmark: repository maintenance at up to a million unique chunks.

A synthetic repository stands in for a multi-TiB estate without 4 TiB of disk: N unique
chunks whose payloads are 16 bytes each (a real repository's chunk *count* is what costs
maintenance time and memory, not the payload size), and S snapshot manifests that reference
them ten times over in total (each manifest is a 4 MiB-chunked "disk" whose chunk list
points at a sliding window of the chunk pool). Chunk objects are real, encrypted, MAC'd
objects under their real names; only the fsync of each file is skipped while generating.

Then it times the real CLI on it, cold process each time, with GNU time for wall, CPU and
peak RSS: ``snapshots --json``, ``check`` (structure), ``copy`` to an empty repository
sharing the key, and ``forget --keep-last 1`` then ``prune --safety-window 0s``.

    .venv/bin/python bench/scale.py                 # 10k, 100k, 300k chunks
    .venv/bin/python bench/scale.py --sizes 1000000 --generate-only  # build it ahead
    .venv/bin/python bench/scale.py --sizes 10000,100000,1000000 --write  # ≈ 6 GB, ~15 min

Results go to the ``scale`` section of docs/benchmarks.md (with --write).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _util import markdown_table, replace_section  # noqa: E402

from vmdr.repository.crypto import TYPE_CHUNK  # noqa: E402
from vmdr.repository.keys import KdfParams  # noqa: E402
from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot  # noqa: E402
from vmdr.repository.repo import Repository, chunk_name  # noqa: E402
from vmdr.storage.registry import open_backend  # noqa: E402

PASSWORD = "scale-bench"
REFS_PER_CHUNK = 10
RSS_LIMIT_MB = 150
GNU_TIME = "/usr/bin/time"


@dataclass
class Run:
    wall: float
    cpu: float
    rss_mb: float
    rc: int


READY = ".scale-ready"  # marks a complete, not yet pruned generated repository


def generate(path: Path, chunks: int, snapshots: int) -> None:
    """Build the synthetic repository at *path* (removed first), unless a complete one
    from ``--generate-only`` is waiting there."""
    if (path / READY).exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    backend = open_backend(str(path))
    repo = Repository.init(backend, passphrase=PASSWORD, kdf=KdfParams.for_tests())
    base = path
    ids: list[bytes] = []
    dirs: set[str] = set()

    def write(i: int) -> bytes:
        payload = i.to_bytes(8, "little") + secrets.token_bytes(8)
        oid = repo.codec.object_id(payload)
        name = base / chunk_name(oid)
        d = str(name.parent)
        if d not in dirs:
            os.makedirs(d, exist_ok=True)
            dirs.add(d)
        name.write_bytes(repo.codec.pack(TYPE_CHUNK, oid, payload))
        return oid

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(write, range(chunks), chunksize=2048))
    refs = chunks * REFS_PER_CHUNK // snapshots
    step = max(1, (chunks - refs) // max(1, snapshots - 1)) if refs < chunks else 0
    for k in range(snapshots):
        start = k * step
        cl = ChunkList(b"".join(ids[(start + j) % chunks] for j in range(refs)))
        disk = DiskRecord(name="vda", size=refs * repo.chunk_size, chunks=cl)
        when = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=k)
        snap = Snapshot(name=f"vm{k % 4:02d}", time=when, disks=[disk],
                        chunk_size=repo.chunk_size)
        repo.save_snapshot(snap)
    repo.close()
    (path / READY).write_text(f"{chunks} {snapshots}\n")


def timed(args: list[str], env: dict[str, str]) -> Run:
    fmt = "%e %U %S %M"
    t0 = time.monotonic()
    p = subprocess.run([GNU_TIME, "-f", fmt, "-o", "/tmp/vmdr-scale-time", *args], env=env,
                       capture_output=True, text=True)
    if p.returncode not in (0, 1):
        sys.stderr.write(p.stderr[-2000:])
    wall, user, sys_, rss = Path("/tmp/vmdr-scale-time").read_text().split()[-4:]
    return Run(float(wall) or time.monotonic() - t0, float(user) + float(sys_),
               int(rss) / 1024, p.returncode)


def measure(work: Path, chunks: int, snapshots: int) -> dict[str, Run]:
    src, dst = work / f"src-{chunks}", work / f"dst-{chunks}"
    t0 = time.monotonic()
    generate(src, chunks, snapshots)
    print(f"  generated {chunks} chunks, {snapshots} snapshots in {time.monotonic() - t0:.0f} s",
          flush=True)
    vmdr = str(ROOT / ".venv" / "bin" / "vmdr")
    env = {**os.environ, "VMDR_PASSWORD": PASSWORD, "VMDR_CACHE_DIR": str(work / "cache"),
           "VMDR_REPO": str(src)}
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    out = {}
    out["snapshots"] = timed([vmdr, "snapshots", "--json"], env)
    out["check"] = timed([vmdr, "check"], env)
    subprocess.run([vmdr, "repo", "init", "--from-repo", str(src), "-r", str(dst)], env=env,
                   check=True, capture_output=True)
    out["copy"] = timed([vmdr, "copy", "--to", str(dst)], env)
    (src / READY).unlink()  # forget and prune change it
    out["forget"] = timed([vmdr, "forget", "--keep-last", "1"], env)
    out["prune"] = timed([vmdr, "prune", "--safety-window", "0s"], env)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    return out


NOTES = """\
Synthetic repository: N unique 16-byte chunks, {snapshots} manifests with {refs}·N chunk
references in all (a 4 MiB-chunked estate of N unique chunks is N × 4 MiB: a million is
about 4 TiB). Each command runs once as a cold CLI process on the local-directory backend,
timed with GNU time (wall, user+system CPU, peak RSS); the repository sits on the system
disk, so its page cache is warm from generation (one round, not a median of rounds: the
million-chunk point alone takes a quarter of an hour).

- **limit** is the goal of issue 13: peak RSS ≤ {limit} MB at any size. Memory no longer
  grows with the chunk count: manifests are read one at a time, chunk IDs go into
  on-disk SQLite tables (`repository/idset.py`, 8 MiB page cache each), listings go
  shard by shard (`data/XX/`), and `snapshots`/`forget` read manifest headers only.
- `copy`'s floor of ~95 MB at every size is the destination's key slot being opened:
  the memory-hard KDF takes 64 MiB for a moment, before any chunk is touched.
- At a million chunks each manifest holds 500k references (16 MB); reading one (the
  stored object, its plaintext, the chunk list) is most of the ~100 MB of `snapshots`,
  `check` and `prune` there: memory grows with the largest snapshot, not the repository.
- **slope** is the wall time added per 100k unique chunks between two sizes; similar
  slopes for the two intervals mean the time grows linearly.
"""


def render(results: dict[int, dict[str, Run]], sizes: list[int]) -> str:
    ops = list(next(iter(results.values())))
    rows = []
    for op in ops:
        for n in sizes:
            r = results[n][op]
            rows.append([op, f"{n:,}", f"{n * REFS_PER_CHUNK:,}", f"{r.wall:.1f} s",
                         f"{r.cpu:.1f} s", f"{r.rss_mb:.0f} MB", f"≤ {RSS_LIMIT_MB} MB",
                         "met" if r.rss_mb <= RSS_LIMIT_MB and r.rc == 0 else "**not met**"])
        for lo, hi in itertools.pairwise(sizes):
            slope = (results[hi][op].wall - results[lo][op].wall) / (hi - lo) * 1e5
            cpu = (results[hi][op].cpu - results[lo][op].cpu) / (hi - lo) * 1e5
            rows.append([op, f"slope {lo // 1000}k→{hi // 1000}k", "",
                         f"{slope:.2f} s / 100k", f"{cpu:.2f} s / 100k", "", "", ""])
    return markdown_table(["command", "unique chunks", "chunk refs", "wall", "CPU",
                           "peak RSS", "limit", "status"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,300000",
                    help="comma-separated unique-chunk counts (default %(default)s)")
    ap.add_argument("--snapshots", type=int, default=20)
    ap.add_argument("--work", default="/var/tmp/vmdr-scale")
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--render", metavar="JSON",
                    help="results of an earlier run (WORK/results.json): measure only the "
                         "sizes it lacks")
    ap.add_argument("--generate-only", action="store_true",
                    help="only build the repositories (a later run times them)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.generate_only:
        for n in sizes:
            t0 = time.monotonic()
            generate(work / f"src-{n}", n, a.snapshots)
            print(f"generated {n} chunks in {time.monotonic() - t0:.0f} s", flush=True)
        return 0
    results: dict[int, dict[str, Run]] = {}
    if a.render:
        doc = json.loads(Path(a.render).read_text())
        results = {int(n): {op: Run(**r) for op, r in ops.items()} for n, ops in doc.items()}
        sizes = sorted(results)
    for n in sizes:
        if n in results:
            continue
        print(f"{n} chunks:", flush=True)
        results[n] = measure(work, n, a.snapshots)
        for op, r in results[n].items():
            print(f"  {op:16} {r.wall:7.1f} s wall {r.cpu:7.1f} s CPU {r.rss_mb:6.0f} MB rc={r.rc}",
                  flush=True)
        (work / "results.json").write_text(json.dumps(
            {str(k): {op: asdict(r) for op, r in v.items()} for k, v in results.items()}))
    table = render(results, sizes)
    print(table)
    if a.write:
        body = ("## Scale: maintenance at up to a million chunks\n\n"
                "*Generated by `bench/scale.py` on "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; do not edit by hand.*\n\n"
                + NOTES.format(snapshots=a.snapshots, refs=REFS_PER_CHUNK, limit=RSS_LIMIT_MB)
                + "\n" + table + "\n")
        replace_section(ROOT / "docs" / "benchmarks.md", "scale", body,
                        "Scale: maintenance at up to a million chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
