"""``make bench``: the vmdr repository engine side by side with borg and restic.

Ingest, unchanged re-ingest and restore of one ext4 disk image, every tool in the same
run, interleaved (vmdr, borg, restic, vmdr, …), page cache dropped before each timed
command. Prints tables and rewrites the repository section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _limits import Rates, measure
from _tools import KINDS, ROOT, WORK, Tool, Vmdr, clean_env, freeze_vmdr, vmdr_at
from _util import (
    GiB,
    ImageInfo,
    MiB,
    Series,
    Timed,
    build_image,
    drop_caches,
    fmt_ratio,
    machine,
    markdown_table,
    paired_ratio,
    ratio,
    replace_section,
    same_content,
    text_table,
    timed,
    versions,
)

TOOLS = ("vmdr", "borg", "restic")
TARGETS = {  # measure -> (peer, factor, description)
    "ingest": ("borg", 0.4, "≤ 0.4× borg's"),
    "stored": ("borg", 1.0, "≤ borg's"),
    "reingest": ("borg", 0.3, "≤ 0.3× borg's"),
    "restore": ("restic", 0.6, "≤ 0.6× restic's"),
}
RSS_TARGET_MB = 150



class Bench:
    def __init__(self, args: argparse.Namespace, image: ImageInfo) -> None:
        self.args, self.image = args, image
        self.wall: dict[tuple[str, str], Series] = defaultdict(Series)
        self.rss: dict[tuple[str, str], Series] = defaultdict(Series)
        self.cpu: dict[tuple[str, str], Series] = defaultdict(Series)
        self.stored: dict[str, Series] = defaultdict(Series)
        self.raw: list[dict[str, object]] = []
        self.rates: Rates | None = None
        self.loads: list[float] = []  # 1-minute load average at every timed command
        self.plain_stored: tuple[int, int] | None = None  # vmdr's bytes read and stored

    def record(self, phase: str, tool: str, t: Timed, rnd: int, **more: object) -> None:
        self.loads.append(os.getloadavg()[0])
        self.wall[phase, tool].add(t.wall)
        self.rss[phase, tool].add(t.rss_kb * 1024)
        self.cpu[phase, tool].add(t.cpu)
        self.raw.append({"round": rnd, "phase": phase, "tool": tool, "wall_s": round(t.wall, 3),
                         "cpu_s": round(t.cpu, 2), "rss_kb": t.rss_kb, **more})
        extra = " ".join(f"{k}={v}" for k, v in more.items())
        print(f"  round {rnd} {phase:<13} {tool:<7} {t.wall:7.1f} s  cpu {t.cpu:6.1f} s  "
              f"{t.rss_kb / 1024:6.0f} MiB  {extra}", flush=True)

    def one_round(self, rnd: int) -> None:
        img = self.image.path
        tools: dict[str, Tool] = {n: KINDS[n](WORK / "runs" / f"r{rnd}" / n, img)
                                  for n in self.args.only}
        # 1. first ingest into a fresh repository (the level sweep interleaved with it)
        levels = [vmdr_at(lv)(WORK / "runs" / f"r{rnd}" / f"vmdr-l{lv}", img)
                  for lv in self.args.levels if "vmdr" in self.args.only]
        for tool in [*tools.values(), *levels]:
            tool.init()
            drop_caches()
            t = tool.backup("a1")
            size = tool.stored()
            self.stored[tool.name].add(size)
            keep = ("bytes_read", "bytes_stored", "chunks_new", "chunks_zero")
            if tool.name == "vmdr" and "bytes_read" in tool.last:
                self.plain_stored = (int(str(tool.last["bytes_read"])),
                                     int(str(tool.last["bytes_stored"])))
            self.record("ingest", tool.name, t, rnd, stored=size,
                        **{k: v for k, v in tool.last.items() if k in keep})
            if tool in levels and not self.args.keep:
                tool.drop()
        # 2. the unchanged image again, into the same repository
        for tool in tools.values():
            drop_caches()
            self.record("reingest", tool.name, tool.backup("a2"), rnd)
        # ...and the peers forced to read it all again (informational: vmdr always reads)
        for name in ("vmdr", "borg", "restic"):
            if name in tools and (name != "vmdr" or Vmdr.force_read):
                drop_caches()
                self.record("reingest-full", name, tools[name].backup("a3", True), rnd)
        # 3. restore to a fresh directory; check the bytes on the first round
        for tool in tools.values():
            out = WORK / "restore" / tool.name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            drop_caches()
            t, dest = tool.restore(out)
            flush = timed(["sync"], os.environ.copy()).wall
            ok = same_content(dest, img) if rnd == 1 else None
            if ok is False:
                raise SystemExit(f"{tool.name} restored {dest} with different content")
            self.wall["restore+sync", tool.name].add(t.wall + flush)
            self.record("restore", tool.name, t, rnd, sync_s=round(flush, 2), verified=ok)
            shutil.rmtree(out)
        if not self.args.keep:
            shutil.rmtree(WORK / "runs" / f"r{rnd}")

    # ------------------------------------------------------------------ reporting
    def cell(self, phase: str, tool: str) -> str:
        return self.wall[phase, tool].fmt()

    def comparison(self) -> tuple[list[str], list[list[str]]]:
        tools = self.args.only
        peers = [p for p in tools if p != "vmdr"] if "vmdr" in tools else []
        header = ["measure", *tools, *(f"vmdr/{p}" for p in peers)]
        rows: list[list[str]] = []

        def add(label: str, series: Callable[[str], Series], unit: str = "s",
                scale: float = 1.0, digits: int = 1) -> None:
            rows.append([label, *(series(t).fmt(unit, scale, digits) for t in tools),
                         *(fmt_ratio(paired_ratio(series("vmdr"), series(p))) for p in peers)])

        add("ingest time", lambda t: self.wall["ingest", t])
        add("unchanged re-ingest", lambda t: self.wall["reingest", t])
        add("re-ingest, peers forced to re-read¹",
            lambda t: self.wall["reingest-full" if t != "vmdr" or Vmdr.force_read
                                else "reingest", t])
        add("restore time", lambda t: self.wall["restore", t])
        add("restore + sync²", lambda t: self.wall["restore+sync", t])
        add("stored after ingest", lambda t: self.stored[t], "MiB", MiB, 0)
        for phase in ("ingest", "reingest", "restore"):
            add(f"CPU user+sys³, {phase}", self.of(self.cpu, phase))
        for phase in ("ingest", "reingest", "restore"):
            add(f"peak RSS, {phase}", self.of(self.rss, phase), "MiB", MiB, 0)
        return header, rows

    @staticmethod
    def of(table: dict[tuple[str, str], Series], phase: str) -> Callable[[str], Series]:
        return lambda t: table[phase, t]

    def level_rows(self) -> tuple[list[str], list[list[str]], str]:
        names = {lv: f"vmdr-l{lv}" for lv in self.args.levels}
        names[3] = "vmdr"
        base_t, base_c = self.wall["ingest", "vmdr"], self.cpu["ingest", "vmdr"]
        base_s = self.stored["vmdr"]
        header = ["zstd level", "ingest time", "ingest CPU", "stored", "time vs 3", "CPU vs 3",
                  "stored vs 3"]
        rows = [[f"{lv}{' (default)' if lv == 3 else ''}", self.wall["ingest", n].fmt(),
                 self.cpu["ingest", n].fmt(), self.stored[n].fmt("MiB", MiB, 0),
                 fmt_ratio(paired_ratio(self.wall["ingest", n], base_t)),
                 fmt_ratio(paired_ratio(self.cpu["ingest", n], base_c)),
                 fmt_ratio(ratio(self.stored[n], base_s))] for lv, n in sorted(names.items())]
        # Rule: move off 3 only for a clear win on one axis at little cost on the other;
        # cost is CPU time, which the other jobs on a shared machine disturb far less.
        advice = "keep the default level 3"
        for lv, n in sorted(names.items()):
            rt = paired_ratio(self.cpu["ingest", n], base_c)
            rs = ratio(self.stored[n], base_s)
            if lv == 3 or rt is None or rs is None:
                continue
            if (rs <= 0.90 and rt <= 1.10) or (rt <= 0.90 and rs <= 1.02):
                advice = f"switch the default to level {lv}"
        return header, rows, advice

    def limit(self, key: str, peer: str) -> str:
        """The primitives-only wall time for *key* on every core, and its ratio to the
        peer's median wall time (see bench/_limits.py)."""
        if self.rates is None or self.plain_stored is None or key not in ("ingest", "restore"):
            return "–"
        plain, stored = self.plain_stored
        cpu = (self.rates.ingest_cpu if key == "ingest" else self.rates.restore_cpu)(plain, stored)
        wall = cpu / (os.cpu_count() or 1)
        theirs = self.wall[key, peer].median if self.wall[key, peer].values else 0.0
        vs = f" = {wall / theirs:.2f}× {peer}" if theirs else ""
        return f"{wall:.1f} s ({cpu:.1f} CPU-s){vs}"

    def targets(self) -> tuple[list[str], list[list[str]]]:
        rows = []
        for key, (peer, factor, text) in TARGETS.items():
            mine = self.stored["vmdr"] if key == "stored" else self.wall[key, "vmdr"]
            theirs = self.stored[peer] if key == "stored" else self.wall[key, peer]
            r = paired_ratio(mine, theirs)
            rc = None if key == "stored" else paired_ratio(self.cpu[key, "vmdr"],
                                                           self.cpu[key, peer])
            label = {"ingest": "ingest time", "stored": "stored size",
                     "reingest": "unchanged re-ingest", "restore": "restore time"}[key]
            met = "–" if r is None else ("met" if r <= factor else "**not met**")
            shown = "–" if r is None else f"{r:.{3 if round(r, 2) == factor else 2}f}× {peer}"
            rows.append([label, text, shown, met,
                         "–" if rc is None else f"{rc:.2f}× {peer}", self.limit(key, peer)])
        peaks = [v for ph in ("ingest", "reingest", "restore") for v in self.rss[ph, "vmdr"].values]
        if peaks:
            top = max(peaks) / 1e6
            rows.append(["peak RSS", f"≤ {RSS_TARGET_MB} MB", f"{top:.0f} MB (worst run)",
                         "met" if top <= RSS_TARGET_MB else "**not met**", "–", "–"])
        return ["measure", "target", "measured (wall)", "status", "CPU-time ratio³",
                "limit⁴"], rows

    def report(self, vers: dict[str, str], started: str) -> str:
        a, img = self.args, self.image
        h, rows = self.comparison()
        lh, lrows, advice = self.level_rows()
        th, trows = self.targets()
        for title, hh, rr in (("comparison (median, min–max)", h, rows),
                              ("zstd level sweep", lh, lrows), ("targets", th, trows)):
            print(f"\n== {title}\n{text_table(hh, rr)}")
        print(f"\nlevel advice: {advice}")
        return "\n".join([
            "## Repository engine: vmdr vs borg vs restic", "",
            f"*Generated by `make bench` (`bench/run.py{' --quick' if a.quick else ''}`) "
            f"on {started}; do not edit by hand.*", "",
            f"- **Machine:** {machine()}",
            f"- **Versions:** {vers['vmdr']}; {vers['borg']}; {vers['restic']}",
            f"- **Data:** {img.describe()}.",
            f"- **Load:** 1-minute load average after each timed command "
            f"{min(self.loads, default=0):.1f}–{max(self.loads, default=0):.1f} "
            f"(median {sorted(self.loads)[len(self.loads) // 2] if self.loads else 0:.1f}) on "
            f"{os.cpu_count()} CPUs." + (f" {a.note}" if a.note else ""),
            f"- **Runs:** {a.runs} round(s); in each round every tool runs each phase in turn "
            f"({', '.join(a.only)}), so all tools share the same machine noise; medians with "
            "(min–max). A ratio is the median of the per-round ratios (the two tools ran "
            "minutes apart in the same round). Status is judged on wall time; the CPU-time "
            "ratio is the same comparison with most of the machine noise taken out.", "",
            markdown_table(th, trows), "",
            markdown_table(h, rows), "",
            ("¹ vmdr skips an image file whose device, inode, size, mtime and ctime match the "
             "previous snapshot's; " if Vmdr.force_read else
             "¹ vmdr has no per-file metadata shortcut: it always reads and hashes the "
             "allocated extents; ")
            + "restic skips the unchanged file through its parent snapshot. borg reads it "
            "every time even with its files cache on: borg never remembers the file with the "
            "newest ctime of an archive, and a single-image archive has only that one. This "
            "row forces a full re-read (" + ("`vmdr image backup --force-read`, "
                                            if Vmdr.force_read else "")
            + "`borg create --files-cache disabled`, `restic backup --force`).  ",
            "² the tool's wall time plus the `sync` that follows it: vmdr fsyncs the restored "
            "image before it exits, borg and restic leave dirty pages behind.  ",
            "³ user + system CPU seconds of the process and its children (GNU time `%U + %S`): "
            "less sensitive than wall time to the other jobs sharing this machine.  ",
            "⁴ what the primitives alone allow on this machine: the CPU time zstd, AES-256-GCM "
            "and BLAKE3 need for vmdr's bytes (plaintext through zstd and BLAKE3, stored bytes "
            "through AES-GCM) spread over every core, with no I/O, interpreter or key "
            "derivation (`bench/_limits.py`; "
            + (self.rates.describe() if self.rates else "not measured") + ").", "",
            "### Method", "",
            "- Every ingest goes into a **fresh repository** with a fresh cache directory "
            "(`VMDR_CACHE_DIR`, `BORG_BASE_DIR`, `RESTIC_CACHE_DIR`); the re-ingest goes into "
            "the same repository (and cache) right after; restores write to an empty "
            "directory that is deleted afterwards.",
            "- `sync; echo 3 > /proc/sys/vm/drop_caches` before every timed command: all reads "
            "are cold.",
            "- Wall time, CPU time and peak RSS (of the largest process) from GNU "
            "`/usr/bin/time -f '%e %M %U %S'`. Stored size is the apparent size of every file "
            "in the repository directory after the first ingest.",
            "- vmdr: `vmdr repo init` (AES-256-GCM, zstd level 3, 4 MiB chunks), `vmdr image "
            "backup` (reads only allocated extents, found with SEEK_DATA/SEEK_HOLE), `vmdr "
            "image restore --format raw` (sparse output). A real passphrase with the default "
            "argon2id key slot (t=3, 64 MiB, p=2), so each command pays one KDF (time and "
            "64 MiB of memory) when it opens the repository.",
            "- borg: `borg init --encryption repokey-blake2`, `borg create --compression zstd,3 "
            "--chunker-params fixed,4194304`, `borg extract`.",
            "- restic: `restic init --repository-version 2` (compression `auto`), `restic "
            "backup`, `restic restore latest`.",
            "- borg and restic read the raw image like any file, holes included (their normal "
            "behaviour; `borg create --sparse` was not used), and write the restored image "
            "fully allocated. vmdr skips holes on both sides.",
            "- The first round compares every restored image byte for byte with the source "
            "(`cmp`).", "",
            "### zstd level", "",
            "vmdr ingest (same rounds, fresh repository each) at other `--compression-level`s; "
            "level 3 is the vmdr column above.", "",
            markdown_table(lh, lrows), "",
            f"Rule applied: change the default only if a level stores ≥ 10 % less at ≤ 10 % "
            f"more ingest CPU time, or needs ≥ 10 % less CPU at ≤ 2 % more storage (CPU, "
            f"not wall time: on a shared machine wall time is mostly noise). Result: "
            f"**{advice}**.",
        ])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 GiB image, 1 round, no doc update unless --doc is given")
    p.add_argument("--runs", type=int, help="rounds (default 3, or 1 with --quick)")
    p.add_argument("--only", default=",".join(TOOLS),
                   help="comma-separated subset of vmdr,borg,restic")
    p.add_argument("--levels", default="1,6",
                   help="extra vmdr zstd levels to sweep on ingest ('' for none; default 1,6)")
    p.add_argument("--note", default="", help="a sentence for the report's Load line")
    p.add_argument("--keep", action="store_true", help="keep repositories under bench/work/runs")
    p.add_argument("--doc", type=Path, help="markdown file to update "
                   "(default docs/benchmarks.md; none with --quick)")
    a = p.parse_args()
    a.only = [t for t in a.only.split(",") if t]
    if not a.only or set(a.only) - set(TOOLS):
        p.error(f"--only takes a subset of {','.join(TOOLS)}")
    a.levels = sorted({int(x) for x in a.levels.split(",") if x.strip()} - {3})
    a.runs = a.runs or (1 if a.quick else 3)
    if a.doc is None and not a.quick:
        a.doc = ROOT / "docs" / "benchmarks.md"
    return a


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py must run as root (it drops the page cache)")
    now = dt.datetime.now(dt.UTC)
    started = now.strftime("%Y-%m-%d %H:%M UTC")
    size = GiB if args.quick else 4 * GiB
    print(f"building or reusing the {size // GiB} GiB image under {WORK} ...", flush=True)
    # 4 GiB: ~2.4 GB of files + 300 MiB random; --quick scales both down to 1 GiB.
    image = build_image(WORK, size, files_budget=size * 2_500_000_000 // (4 * GiB),
                        random_size=size * 300 // 4096)
    print(f"image: {image.describe()}", flush=True)
    digest = freeze_vmdr()
    print(f"vmdr under test: {Vmdr.code} (source digest {digest}, "
          f"--force-read {'supported' if Vmdr.force_read else 'absent'})", flush=True)
    bench = Bench(args, image)
    for rnd in range(1, args.runs + 1):
        print(f"round {rnd}/{args.runs}", flush=True)
        bench.one_round(rnd)
    bench.rates = measure(image.path)
    print(f"primitives: {bench.rates.describe()}", flush=True)
    vers = versions(ROOT, Vmdr.exe, clean_env(PYTHONPATH=Vmdr.code))
    vers["vmdr"] += f", source digest {digest} (copied from src/ when the run started)"
    body = bench.report(vers, started)
    (WORK / f"results-{now:%Y%m%dT%H%M%S}.json").write_text(json.dumps(
        {"started": started, "args": {k: str(v) for k, v in vars(args).items()},
         "versions": vers, "runs": bench.raw}, indent=1, default=str))
    if args.doc:
        replace_section(args.doc, "repository", body, "vmdr benchmarks")
        print(f"\nwrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
