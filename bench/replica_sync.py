"""Issue 11: a replica cycle after ~1 % of the data disk changed vs a full ``vmdr restore``
of the same VM, both feeds, at the test guest's size and at 4 GiB (section
``replica-sync`` of docs/benchmarks.md; ``bench/replica.py`` keeps the RPO runs).

Two libvirt hosts in network namespaces (tests/multihost): the guest on h1, the DR host h2
reached over ssh on the test network; every vmdr command runs inside h1, nothing contacts
a test address from the root namespace. Per size, in one run: a repository on h1, a full
backup, the two seeds (direct, repository), then ``--runs`` rounds of

1. ``vmdr restore`` of the VM from the repository (full, cold cache);
2. a direct cycle and a repository cycle with nothing changed (the fixed cost);
3. the guest rewrites 1 % of its data disk (``dd if=/dev/urandom of=/dev/vdb
   oflag=direct`` through the guest agent, a new place each round);
4. a direct cycle (cold cache), an incremental ``vmdr backup``, a repository cycle (cold).

Figures are medians over the rounds; every cycle's own step timings (``timings`` in its
``--json``) give the profile. The sources are byte-compiled first, as an installed
package is (this session runs Python with PYTHONDONTWRITEBYTECODE, so a checkout would
compile every module on every command). Run as root under ``flock /tmp/vmdr-bench.lock
flock /tmp/vmdr-heavy.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import drop_caches, replace_section  # noqa: E402
from replica import DR_ROOT, PY, vmdr  # noqa: E402
from tests.multihost.cluster import Cluster  # noqa: E402
from tests.multihost.hosts import Host  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
LIMIT = 0.2


def cold(h: Host, *args: str) -> tuple[float, dict[str, Any]]:
    drop_caches()
    t0 = time.monotonic()
    r = vmdr(h, *args)
    return time.monotonic() - t0, r


# "before": every cycle logs in to the DR host twice (its own ssh control master and
# libvirt's qemu+ssh connection, at the same time), as before the shared master; with
# --before-src the cycles run that older checkout's code; "after": this checkout, the
# persistent master of the DR host (vmdr.hypervisor.ssh_mux) left up by the previous
# cycle as under the agent's one-minute schedule carrying both
VARIANTS = {"before": "0", "after": "300"}
BEFORE_SRC: Path | None = None


def variant(name: str) -> None:
    os.environ["VMDR_SSH_PERSIST"] = VARIANTS[name]
    src = BEFORE_SRC if name == "before" and BEFORE_SRC is not None else ROOT / "src"
    os.environ["PYTHONPATH"] = str(src)


def guest_dd(h: Host, dom: str, mib: int, seek_mib: int) -> None:
    """The guest rewrites ``mib`` MiB of vdb from ``seek_mib`` with random bytes."""
    from vmdr.hypervisor import connect

    hv = connect(h.uri)
    try:
        r = hv.lookup(dom).guest_exec(
            ["/bin/dd", "if=/dev/urandom", "of=/dev/vdb", "bs=1M", f"count={mib}",
             f"seek={seek_mib}", "oflag=direct", "iflag=fullblock"], timeout=600)
        if r.exitcode != 0:
            raise SystemExit(f"dd in the guest failed: {r.stderr}")
    finally:
        hv.close()


def one_size(image: Path | None, runs: int, compare: bool = False) -> dict[str, Any]:
    res: dict[str, Any] = {"image": str(image) if image else None, "runs": runs,
                           "rounds": [], "before_src": str(BEFORE_SRC) if compare and
                           BEFORE_SRC else None}
    with Cluster(hosts=2, etcd=False, sshd=True) as c, \
            tempfile.TemporaryDirectory(prefix="vmdr-bench-sync-", dir="/var/tmp") as tmp:
        h1, h2 = c.hosts
        g = c.new_guest(local_to=h1, writer_rate=0)
        if image is not None:
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                            str(image), str(g.data_disk)], check=True)
            os.chmod(g.data_disk, 0o644)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                          str(g.data_disk)], check=True, text=True,
                                         capture_output=True).stdout)
        res.update(data_virtual=info["virtual-size"], data_allocated=info["actual-size"])
        g.start(h1)
        g.wait_heartbeat(180)
        pw = Path(tmp) / "pw"
        pw.write_text("bench passphrase\n")
        pw.chmod(0o600)
        os.environ.update(VMDR_REPO=f"{tmp}/repo", VMDR_PASSWORD_FILE=str(pw),
                          VMDR_LOCK_DIR=f"{tmp}/locks")
        vmdr(h1, "repo", "init")
        to = c.ssh_uri(h2) + "&known_hosts=/dev/null"
        vmdr(h1, "backup", g.name)
        common = ["replicate", g.name, "--to", to, "--dir", DR_ROOT, "--points", "5"]
        rcommon = ["replicate", g.name, "--to", to, "--dir", DR_ROOT + "-repo", "--feed",
                   "repository", "--points", "3", "--standby-name", f"{g.name}-rrepo"]
        variant("after")  # the seeds leave the DR host's shared master up
        res["seed_direct_s"], _ = cold(h1, *common)
        res["seed_repo_s"], _ = cold(h1, *rcommon)
        mib = max(1, round(res["data_virtual"] / (1 << 20) / 100))
        res["changed_mib"] = mib
        ssh, cli = [], []
        for _ in range(3):
            t0 = time.monotonic()
            h1.run(*c.ssh_command(h2), "true", timeout=60)
            ssh.append(time.monotonic() - t0)
            t0 = time.monotonic()
            h1.run(*PY, "--version", timeout=60)
            cli.append(time.monotonic() - t0)
        res["ssh_s"], res["cli_start_s"] = statistics.median(ssh), statistics.median(cli)
        for i in range(runs):
            rd: dict[str, Any] = {}
            rd["restore_s"], _ = cold(h1, "restore", g.name, "--target-dir",
                                      f"{tmp}/restored", "--name", f"{g.name}-r")
            h1.virsh("undefine", f"{g.name}-r", check=False)
            subprocess.run(["rm", "-rf", f"{tmp}/restored"], check=True)
            for k, name in enumerate(VARIANTS if compare else ["after"]):
                variant(name)
                # a new place per round and variant, past the start of the disk (metadata)
                seek = (res["data_virtual"] >> 20) // 4 + (i * 2 + k * 2 * runs) * mib
                vd = _round(h1, g, common, rcommon, mib, seek)
                if name == "after" or not compare:
                    rd.update(vd)
                else:
                    rd.update({f"b_{key}": v for key, v in vd.items()})
            rd["load1"] = os.getloadavg()[0]  # the machine is shared: how busy it was
            res["rounds"].append(rd)
            print(json.dumps({k: v for k, v in rd.items() if k.endswith("_s")}), flush=True)
        variant("after")
    return res


def _round(h1: Host, g: Any, common: list[str], rcommon: list[str], mib: int,
           seek: int) -> dict[str, Any]:
    """One variant's cycles of a round: idle direct and repository cycles, then the 1 %
    change through each feed (and the direct feed once more with --no-compress)."""
    rd: dict[str, Any] = {}
    rd["idle_direct_s"], r = cold(h1, *common)
    rd["idle_direct"] = r["results"][0]
    vmdr(h1, "backup", g.name)
    rd["idle_repo_s"], r = cold(h1, *rcommon)
    rd["idle_repo"] = r["results"][0]
    guest_dd(h1, g.name, mib, seek)
    rd["direct_s"], r = cold(h1, *common)
    rd["direct"] = r["results"][0]
    t0 = time.monotonic()
    drop_caches()
    vmdr(h1, "backup", g.name)
    rd["backup_inc_s"] = time.monotonic() - t0
    rd["repo_s"], r = cold(h1, *rcommon)
    rd["repo"] = r["results"][0]
    # the same change once more, sent without ssh compression (--no-compress)
    guest_dd(h1, g.name, mib, seek + mib)
    rd["plain_s"], r = cold(h1, *common, "--no-compress")
    rd["plain"] = r["results"][0]
    vmdr(h1, "backup", g.name)  # the repository standby catches up (untimed), so
    vmdr(h1, *rcommon)  # the next round's idle repository cycle is idle
    return rd


def med(rounds: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    if sub is None:
        return statistics.median(float(r[key]) for r in rounds)
    return statistics.median(float(r[key].get(sub, 0.0)) for r in rounds)


def med_timings(rounds: list[dict[str, Any]], key: str) -> dict[str, float]:
    steps: list[str] = []
    for r in rounds:
        steps += [s for s in r[key].get("timings", {}) if s not in steps]
    return {s: statistics.median(float(r[key].get("timings", {}).get(s, 0.0))
                                 for r in rounds) for s in steps}


def summary(r: dict[str, Any]) -> dict[str, Any]:
    out = _summary(r, r["rounds"])
    out["load1_all"] = [round(float(x["load1"]), 1) for x in r["rounds"] if "load1" in x]
    out["before_src"] = r.get("before_src")
    before = [{**{k[2:]: v for k, v in x.items() if k.startswith("b_")},
               "restore_s": x["restore_s"]} for x in r["rounds"] if "b_direct_s" in x]
    if before:
        out["before"] = _summary(r, before)
    return out


def _summary(r: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: r[k] for k in ("data_virtual", "data_allocated", "changed_mib",
                                              "seed_direct_s", "seed_repo_s", "ssh_s",
                                              "cli_start_s", "runs")}
    for k in ("restore_s", "direct_s", "repo_s", "backup_inc_s", "plain_s"):
        out[k] = med(rounds, k)
        out[k + "_all"] = [round(float(x[k]), 2) for x in rounds]
    for feed in ("direct", "repo"):
        # a cycle is idle when it moved (almost) nothing: an earlier run of this bench left
        # the repository a change behind after the --no-compress cycle
        idle = [x for x in rounds if x[f"idle_{feed}"]["bytes_moved"] < (1 << 20)] or rounds
        out[f"idle_{feed}_s"] = med(idle, f"idle_{feed}_s")
        out[f"idle_{feed}_n"] = len(idle)
        out[f"idle_{feed}_timings"] = med_timings(idle, f"idle_{feed}")
    for feed in ("direct", "repo", "plain"):
        out[f"{feed}_bytes"] = med(rounds, feed, "bytes_moved")
        out[f"{feed}_sent"] = med(rounds, feed, "bytes_sent")
        out[f"{feed}_timings"] = med_timings(rounds, feed)
        out[f"{feed}_ratio"] = statistics.median(x[f"{feed}_s"] / x["restore_s"]
                                                 for x in rounds)
    return out


def _size(s: dict[str, Any]) -> str:
    gib = s["data_virtual"] / (1 << 30)
    return f"{gib:.0f} GiB" if gib >= 1 else f"{s['data_virtual'] >> 20} MiB"


def _alloc(s: dict[str, Any]) -> str:
    a = s["data_allocated"]
    return f"{a / 1e9:.2f} GB allocated" if a >= 1e9 else f"{a / 1e6:.0f} MB allocated"


def break_even(s: dict[str, Any], feed: str) -> float | None:
    """GiB of such data (same allocation ratio, same 1 % of random bytes changed) from
    which ``feed`` meets the limit: fixed + per-GiB change cost ≤ LIMIT × restore; None if
    never (extrapolated from one size's figures)."""
    gib = s["data_virtual"] / (1 << 30)
    fixed = s[f"idle_{'direct' if feed == 'plain' else feed}_s"]
    per_gib_change = max(0.0, s[f"{feed}_s"] - fixed) / gib
    per_gib_restore = s["restore_s"] / gib
    room = LIMIT * per_gib_restore - per_gib_change
    return None if room <= 0 else fixed / room


def _profile(t: dict[str, float], wall: float) -> str:
    inner = sum(t.values())
    parts = [f"{k} {v:.2f}" for k, v in t.items() if v >= 0.005]
    return (f"{wall:.2f} s wall = {wall - inner:.2f} outside the steps (process start-up, "
            "imports, exit) + "
            + " + ".join(parts))


def render(sizes: list[dict[str, Any]]) -> str:
    mib = 1 << 20
    rows = ["| data disk | measure | vmdr (median of the rounds) | limit | |",
            "|---|---|---|---|---|"]
    notes = []
    for s in sizes:
        base, name = s["restore_s"], _size(s)
        rows.append(f"| {name} ({_alloc(s)}; plus the 64 MiB boot disk) | full `vmdr "
                    f"restore` of the VM, cold cache | {base:.2f} s "
                    f"({', '.join(f'{x:.2f}' for x in s['restore_s_all'])}) | baseline | |")
        for feed, what in (("direct", "direct feed (dirty bitmaps, host to host over ssh, "
                                      "zstd frames)"),
                           ("repo", "repository feed (the incremental backup's changed "
                                    "chunks, zstd frames)"),
                           ("plain", "direct feed with `--no-compress` (raw frames)")):
            t, ratio = s[f"{feed}_s"], s[f"{feed}_ratio"]
            ok = "**met**" if ratio <= LIMIT else "**not met**"
            rows.append(
                f"| {name} | replica sync after the guest rewrote {s['changed_mib']} MiB (1 %), "
                f"{what}, cold cache | {t:.2f} s = **{ratio:.2f}×** restore, "
                f"{s[f'{feed}_bytes'] / mib:.1f} MiB moved"
                + (f", {s[f'{feed}_sent'] / mib:.1f} MiB sent " if s.get(f"{feed}_sent")
                   else " ") +
                f"({', '.join(f'{x:.2f}' for x in s[f'{feed}_s_all'])} s) | ≤ {LIMIT}× "
                f"restore | {ok} |")
        rows.append(f"| {name} | cycle with nothing changed (the fixed cost), direct / "
                    f"repository | {s['idle_direct_s']:.2f} s / {s['idle_repo_s']:.2f} s "
                    f"(median of {s['idle_direct_n']} / {s['idle_repo_n']}) | — | |")
        rows.append(f"| {name} | first sync (seed), direct / repository | "
                    f"{s['seed_direct_s']:.1f} s / {s['seed_repo_s']:.1f} s | — | |")
        notes.append(
            f"* {name}, 1 % changed: direct {_profile(s['direct_timings'], s['direct_s'])}; "
            f"repository {_profile(s['repo_timings'], s['repo_s'])}; direct `--no-compress` "
            f"{_profile(s['plain_timings'], s['plain_s'])}. Nothing changed: direct "
            f"{_profile(s['idle_direct_timings'], s['idle_direct_s'])}. One ssh login "
            f"(`ssh h2 true`) {s['ssh_s']:.2f} s; `vmdr --version` {s['cli_start_s']:.2f} s.")
    compare = _compare(sizes)
    return "\n".join([
        "### Replica sync after a 1 % change vs a full restore",
        "",
        "`python bench/replica_sync.py --runs 3 --size series"
        + (" --compare --before-src BEFORE/src" if any(x.get("before") for x in sizes)
           else "")
        + " --image bench/work/image-4g.raw"
        + (" --image bench/work/image-16g.raw" if len(sizes) > 1 else "") + "` under "
        "`flock /tmp/vmdr-bench.lock flock /tmp/vmdr-heavy.lock`: the harness above (two "
        "libvirt hosts in network namespaces, the DR host over ssh on a veth bridge, TCG "
        "guest), writer off. One guest per size, one after the other in one run: the test "
        "estate's (64 MiB boot disk) with bench/run.py's ext4 image as its data disk "
        "(`build_image`: files from /usr/lib and /usr/share, up to 2.5 GB per 4 GiB, plus "
        "300 MiB of random bytes per 4 GiB; the machine has 5.5 GB of such files, so the "
        "16 GiB image holds all of them). The changes go to the DR host as frames of up "
        "to 4 MiB, each zstd level 1 or raw when zstd cannot shrink it (ssh itself does "
        "not compress); `MiB sent` is the stream's size. "
        "Per round: a full restore from a local repository, the guest rewrites 1 % of its "
        "data disk with random bytes (`dd oflag=direct` through the guest agent, a new "
        "place each round), a direct cycle, an incremental backup, a repository cycle, "
        "then the same change elsewhere and a direct cycle with `--no-compress`; "
        "page cache dropped before every timed command; the ratio is per round, then the "
        "median. Sources byte-compiled first, as an installed package is.",
        "",
        *rows,
        "",
        *compare,
        "Where a cycle's time goes (medians; each step as the cycle's `--json` "
        "`timings` report it: `connect` = the DR host's ssh master (reused, or a login) and "
        "libvirt's connection (over a reused master: through a forward of the DR host's "
        "libvirt socket), overlapped, and for the direct feed the first command at the DR "
        "host meanwhile; `begin` = the first command at the DR host (directory, free "
        "space, state); `backup_start` = libvirt's pull-mode backup job, checkpoint and "
        "guest freeze/thaw; `serve` = the state marked, the NBD exports of the changed "
        "disks started with the helper that writes the frames; `copy` = reading the "
        "changes and sending them through ssh until the helper's flush acknowledged; "
        "`commit` = the restore point, rotation and state in one command (over ssh, after "
        "a cycle that moved data: inside the serving session, once the helper "
        "acknowledged); "
        "`backup_end` = the backup job ended and the checkpoint committed):",
        "",
        *notes,
        "",
        *reading(sizes),
        "",
    ])


def _compare(sizes: list[dict[str, Any]]) -> list[str]:
    """Before/after the shared ssh master, the same rounds (each round ran both)."""
    have = [s for s in sizes if "before" in s]
    if not have:
        return []
    how = ("the code before this work (`--before-src`: a private master and libvirt's own "
           "ssh login per cycle, the commit in an ssh session of its own)"
           if any(s.get("before_src") for s in have) else
           "`VMDR_SSH_PERSIST=0` (a private master and libvirt's own ssh login per cycle)")
    rows = ["Before / after the DR host's persistent ssh master and the commit inside the "
            "serving session, in the same rounds (each round ran every cycle twice: first "
            f"with {how}; then this code, with the master the previous cycle left up, as "
            "under the agent's one-minute schedule; each against that round's restore)"
            + "".join(f"; {_size(s)}: 1-minute load average after each round "
                      f"{', '.join(str(x) for x in s['load1_all'])} (the machine is shared)"
                      for s in have if s.get("load1_all")) + ":",
            "",
            "| data disk | cycle | before | after | limit ≤ 0.2× (after) |",
            "|---|---|---|---|---|"]
    for s in have:
        b = s["before"]
        for key, what in (("direct", "direct feed, 1 % changed"),
                          ("repo", "repository feed, 1 % changed"),
                          ("plain", "direct `--no-compress`, 1 % changed")):
            ok = "**met**" if s[f"{key}_ratio"] <= LIMIT else "**not met**"
            rows.append(f"| {_size(s)} | {what} | {b[f'{key}_s']:.2f} s = "
                        f"{b[f'{key}_ratio']:.2f}× | {s[f'{key}_s']:.2f} s = "
                        f"**{s[f'{key}_ratio']:.2f}×** | {ok} |")
        for key, what in (("idle_direct", "nothing changed, direct"),
                          ("idle_repo", "nothing changed, repository")):
            rows.append(f"| {_size(s)} | {what} | {b[f'{key}_s']:.2f} s (connect "
                        f"{b[f'{key}_timings'].get('connect', 0.0):.2f}) | "
                        f"{s[f'{key}_s']:.2f} s (connect "
                        f"{s[f'{key}_timings'].get('connect', 0.0):.2f}) | — |")
    return [*rows, ""]


def reading(sizes: list[dict[str, Any]]) -> list[str]:
    mib = 1 << 20
    out = []
    for s in sorted(sizes, key=lambda x: x["data_virtual"]):
        fixed = s["idle_direct_s"]
        per = {f: (s[f"{f}_s"] - fixed) / (s[f"{f}_bytes"] / mib) if s[f"{f}_bytes"] else 0.0
               for f in ("direct", "plain")}
        verdict = ", ".join(
            f"{what} {s[f'{f}_ratio']:.2f}× ({'met' if s[f'{f}_ratio'] <= LIMIT else 'not met'})"
            for f, what in (("direct", "direct"), ("repo", "repository"),
                            ("plain", "direct `--no-compress`")))
        out.append(
            f"* **{_size(s)}**: {verdict}. Restore {s['restore_s']:.2f} s; a cycle with "
            f"nothing changed {fixed:.2f} s = {fixed / s['restore_s']:.2f}× of it before "
            f"any byte moves; the {s['changed_mib']} MiB of random change cost "
            f"{per['direct'] * 1000:.0f} ms per MiB with zstd frames, "
            f"{per['plain'] * 1000:.0f} ms per MiB raw.")
    return [
        f"Reading it (limit ≤ {LIMIT}× of the same run's restore of the same VM):",
        "",
        *out,
        "",
        "The cycles read and move only the changes (the bytes moved are the bytes the "
        "guest wrote: dirty-bitmap extents for the direct feed, whole 4 MiB chunks for the "
        "repository feed; asserted in tests/integration/test_replica.py). A networked "
        "cycle has a fixed cost that does not grow with the disk (the CLI's start-up, "
        "libvirt's connection and the DR host's ssh master — a login only when no earlier "
        "cycle left the master up —, the source's backup job, two or three sessions at "
        "the DR host), while the restore grows with the disk's data; the "
        "change itself grows with the disk (1 % of it). So the ratio falls with size "
        "until the per-MiB cost of the change dominates. The 1 % the bench writes is "
        "random bytes, the worst case for compression: zstd finds nothing to shrink and "
        "the frames go raw, so the compressed feeds cost about what `--no-compress` "
        "costs; data that compresses moves in fewer bytes.",
        "",
        "The default direct feed and `--no-compress` differ by less than the rounds' "
        "spread (the per-round times above): on random data zstd finds nothing to shrink, "
        "its pass runs while the previous frame goes through ssh, and the frame goes "
        "raw. Where the limit falls between them, the size is at the break-even point.",
        "",
        "A first run of this series the same morning, before a thread wrote the frames "
        "into ssh's pipe (zstd's pass then did not overlap the sending): 4 GiB direct "
        "0.31×, repository 0.31×, `--no-compress` 0.30×; 16 GiB 0.22×, 0.20×, 0.19×.",
        "",
        "The version of this section before the shared master (same bench, a quieter "
        "machine): 4 GiB direct 1.44 s = 0.32×, repository 1.42 s = 0.31×, "
        "`--no-compress` 1.42 s = 0.31×, nothing changed 0.91 s (connect 0.47); 16 GiB "
        "direct 2.29 s = 0.21×, repository 1.95 s = 0.18×, `--no-compress` 2.04 s = "
        "0.18×.",
        "",
        "Before that: 4 GiB direct 2.09 s = 0.43×, "
        "repository 2.27 s = 0.44×, `--no-compress` 1.33 s = 0.28× (ssh's zlib then "
        "compressed the stream, ~0.75 s for 41 MiB of random change); before that work, "
        "direct 3.2 s and a cycle with nothing changed 2.0 s.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds per size (median)")
    ap.add_argument("--image", type=Path, action="append",
                    help="raw data-disk image (bench/vm_backup.py builds the 4 GiB one); "
                         "repeat for a size series in one run (each with its own restore "
                         "baseline)")
    ap.add_argument("--size", choices=("small", "large", "both", "series"), default="both")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--compare", action="store_true",
                    help="every cycle of a round twice: without and with the DR host's "
                         "persistent ssh master (before / after)")
    ap.add_argument("--render", action="store_true",
                    help="only render the section again from bench/work/replica-sync-*.json")
    ap.add_argument("--before-src", type=Path, metavar="DIR",
                    help="with --compare: the 'before' cycles run the vmdr package in DIR "
                         "(e.g. `git archive BASE src | tar -x -C /tmp/before`, DIR "
                         "/tmp/before/src); else this checkout without the shared master")
    a = ap.parse_args()
    global BEFORE_SRC
    BEFORE_SRC = a.before_src.resolve() if a.before_src else None
    if BEFORE_SRC is not None:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(BEFORE_SRC / "vmdr")],
                       check=True, stdout=subprocess.DEVNULL)
    work = ROOT / "bench" / "work"
    images = a.image or [ROOT / "bench" / "work" / "image-4g.raw"]
    if a.render:
        names = ([f"series-{i.stem}" for i in images] if a.size == "series"
                 else ["small", "large"])
        sizes = [summary(json.loads((work / f"replica-sync-{w}.json").read_text()))
                 for w in names if (work / f"replica-sync-{w}.json").exists()]
        replace_section(DOC, "replica-size", render(sizes), "Benchmarks")
        return
    for img in images if a.size != "small" else []:
        if not img.exists():
            raise SystemExit(f"{img} is missing: build it with bench/vm_backup.py --runs 1")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "vmdr")],
                   check=True, stdout=subprocess.DEVNULL)
    work.mkdir(exist_ok=True)
    sizes = []
    if a.size == "series":  # each size's file as soon as it is measured
        for img in images:
            raw = one_size(img, a.runs, a.compare)
            (work / f"replica-sync-series-{img.stem}.json").write_text(json.dumps(raw, indent=1))
            sizes.append(summary(raw))
            print(json.dumps(sizes[-1], indent=1), flush=True)
        if not a.no_doc:
            replace_section(DOC, "replica-size", render(sizes), "Benchmarks")
        return
    for which in ("small", "large"):
        if a.size in (which, "both"):
            raw = one_size(images[0] if which == "large" else None, a.runs)
            (work / f"replica-sync-{which}.json").write_text(json.dumps(raw, indent=1))
            sizes.append(summary(raw))
            print(json.dumps(sizes[-1], indent=1), flush=True)
    if not a.no_doc and a.size == "both":
        replace_section(DOC, "replica-size", render(sizes), "Benchmarks")


if __name__ == "__main__":
    main()
