"""Sequential read of a served snapshot disk vs ``vmdr image restore`` of the same snapshot.

    .venv/bin/python bench/nbd_read.py [--runs 3] [--size-gib 4] [--json out.json]

One 4 GiB ext4 image (reused from bench/work/ if bench/run.py made it, else built the same
way: ``mke2fs -d`` over a copy of /usr/lib and /usr/share plus seeded random data) is
backed up once into bench/work/nbd-repo. Then, interleaved and with the page cache
dropped before each timed command:

* restore: ``vmdr image restore`` to a sparse raw file (what ``vmdr restore`` does per disk);
* serve:   ``vmdr.serve.start_server`` + ``nbdcopy nbd+unix://… /dev/null`` (timing
  starts before the server does, so its start-up counts).

Target: serve throughput ≥ 50 % of restore throughput. Root only (drops caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import GiB, build_image, drop_caches, machine, replace_section, run

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
DOC = ROOT / "docs" / "benchmarks.md"
PASSPHRASE = "bench: correct horse battery staple 2026"
VMDR = [sys.executable, "-m", "vmdr.cli.main"]


def env_for(repo: Path, pwfile: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMDR_")}
    env.update(VMDR_REPO=str(repo), VMDR_PASSWORD_FILE=str(pwfile), VMDR_CONFIG="/dev/null")
    return env


def prepare(size: int) -> tuple[Path, dict[str, str]]:
    image = build_image(WORK, size, files_budget=size * 2_500_000_000 // (4 * GiB),
                        random_size=size * 300 // 4096)
    print(f"image: {image.describe()}", flush=True)
    repo = WORK / f"nbd-repo-{size // GiB}g"
    pw = WORK / "nbd-bench.pw"
    pw.write_text(PASSPHRASE + "\n")
    pw.chmod(0o600)
    env = env_for(repo, pw)
    if not (repo / "vmdr-repo").exists():
        shutil.rmtree(repo, ignore_errors=True)
        run([*VMDR, "repo", "init"], env)
        run([*VMDR, "image", "backup", str(image.path), "--name", "bench", "--no-progress"],
            env)
    return image.path, env


def time_restore(env: dict[str, str], out: Path) -> float:
    out.unlink(missing_ok=True)
    drop_caches()
    t0 = time.monotonic()
    run([*VMDR, "image", "restore", "bench", str(out), "--no-progress"], env)
    os.sync()
    return time.monotonic() - t0


def time_serve(env: dict[str, str]) -> float:
    from vmdr.cli.common import Globals, repository
    from vmdr.config import Config
    from vmdr.serve import start_server

    os.environ.update({k: v for k, v in env.items() if k.startswith("VMDR_")})
    g = Globals(repo=env["VMDR_REPO"], password_file=env["VMDR_PASSWORD_FILE"],
                key_file=None, json=False, progress=False, config=Config())
    repo = repository(g)  # shared lock, as `vmdr serve`
    try:
        snap = repo.resolve("bench")
        drop_caches()
        t0 = time.monotonic()
        with start_server(repo, snap) as srv:
            uri = next(iter(srv.exports.values()))
            subprocess.run(["nbdcopy", uri, "/dev/null"], check=True)
        return time.monotonic() - t0
    finally:
        repo.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    size = args.size_gib * GiB
    image, env = prepare(size)
    out = WORK / "nbd-restore.raw"
    restore_s: list[float] = []
    serve_s: list[float] = []
    try:
        for rnd in range(1, args.runs + 1):
            restore_s.append(time_restore(env, out))
            serve_s.append(time_serve(env))
            print(f"round {rnd}: restore {restore_s[-1]:.1f} s, nbdcopy {serve_s[-1]:.1f} s",
                  flush=True)
    finally:
        out.unlink(missing_ok=True)
    r, s = statistics.median(restore_s), statistics.median(serve_s)
    res = {
        "image": str(image), "size_bytes": size, "runs": args.runs, "machine": machine(),
        "restore_s": restore_s, "serve_s": serve_s,
        "restore_mib_s": round(size / r / (1 << 20), 1),
        "serve_mib_s": round(size / s / (1 << 20), 1),
        "serve_vs_restore": round(r / s, 3),
        "target": "serve ≥ 0.5× restore throughput",
        "met": r / s >= 0.5,
    }
    print(f"median restore {r:.1f} s ({res['restore_mib_s']} MiB/s), nbdcopy of the served "
          f"disk {s:.1f} s ({res['serve_mib_s']} MiB/s): serve = {r / s:.2f}× restore "
          f"(target ≥ 0.5×: {'met' if res['met'] else 'MISSED'})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_doc:
        replace_section(DOC, "nbd", _doc(res), "vmdr benchmarks")
        print(f"wrote the bench:nbd section of {DOC}")
    return 0


def _doc(res: dict[str, object]) -> str:
    rs = ", ".join(f"{x:.1f}" for x in res["restore_s"])  # type: ignore[attr-defined]
    ss = ", ".join(f"{x:.1f}" for x in res["serve_s"])  # type: ignore[attr-defined]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""## Serving a snapshot over NBD: `nbdcopy` of a served disk vs `vmdr restore`

*Generated by `bench/nbd_read.py` on {stamp}; do not edit by hand.*

- **Machine:** {res["machine"]}
- **Data:** the 4 GiB ext4 image of the repository benchmark, backed up once; page cache
  dropped before every timed command; {res["runs"]} interleaved rounds.
- **Restore:** `vmdr image restore NAME out.raw` (includes the final fsync).
- **Serve:** `vmdr serve` start-up plus `nbdcopy nbd+unix:///… null:` of the whole disk.

| measure | runs (s) | throughput (median) |
|---|---|---|
| `vmdr image restore` | {rs} | {res["restore_mib_s"]} MiB/s |
| served disk, `nbdcopy` to null | {ss} | {res["serve_mib_s"]} MiB/s |

Served throughput is **{res["serve_vs_restore"]}× restore's** (target ≥ 0.5×:
{"met" if res["met"] else "**not met**"}).
"""


if __name__ == "__main__":
    sys.exit(main())
