"""Issue 11: replica sync vs a full restore, and achieved RPO of snapshot cycles, the
asynchronous mirror and the synchronous mirror, with the guest's write-latency cost.

Two libvirt hosts in network namespaces (tests/multihost): a test-estate guest on h1 (its
own disks) writing 4 KiB sequence-numbered records, the DR host h2 reached over ssh on the
test network; every vmdr command runs inside h1. Nothing contacts a test address from the
root namespace (libvirt of h1 through its unix socket).

1. ``vmdr restore`` of the VM (full, from a local repository) vs a replica cycle after
   about 1 % of the data disk changed: direct feed (dirty bitmaps) and repository feed
   (the newest backup's changed chunks);
2. achieved RPO over a window per mode, sampled every 0.5 s, with the guest writing:
   snapshot cycles started every 60 s (RPO = age of the newest restore point), the
   asynchronous mirror and the synchronous mirror (RPO = time since the block jobs were
   last in step, read from libvirt);
3. guest write latency in each mode: 100 × (4 KiB write + fsync) in /data, timed through
   the guest agent (TCG guest: the absolute numbers are slow, the difference between
   modes is the cost).

Run as root under ``flock /tmp/vmdr-heavy.lock``; ``--window`` sets the RPO window (the
issue asks for 30 minutes).

``--at-size`` measures only point 1 at a realistic size instead (section ``replica-size``):
the guest's data disk is bench/run.py's 4 GiB ext4 image (``--image``, built by
bench/vm_backup.py: files from /usr/lib and /usr/share plus 300 MiB of random bytes, about
2.6 GB allocated), the guest rewrites 1 % of it (``dd if=/dev/urandom of=/dev/vdb
oflag=direct`` through the guest agent), and every timed command runs with the page cache
dropped. Cycles with nothing changed and an ssh round trip give the fixed per-cycle cost.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from tests.multihost.cluster import Cluster  # noqa: E402
from tests.multihost.hosts import Host  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
PY = [sys.executable, "-m", "vmdr.cli.main"]
DR_ROOT = "/var/lib/libvirt/images/vmdr-replicas"
LAT_WRITES = 100


def vmdr(h: Host, *args: str, timeout: float = 900) -> dict[str, Any]:
    p = h.run(*PY, *args, "--json", check=False, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"vmdr {' '.join(args[:2])} failed: {p.stderr.strip()[-800:]}")
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def timed(h: Host, *args: str) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    r = vmdr(h, *args)
    return time.monotonic() - t0, r


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def in_step(h: Host, dom: str) -> bool | None:
    """True when every disk's block job is in step; None when no job runs."""
    seen = False
    for disk in ("vda", "vdb"):
        out = h.virsh("blockjob", dom, disk, "--raw", check=False).stdout
        m = re.search(r"cur=(\d+)\s+end=(\d+)", out)
        if not m:
            continue
        seen = True
        if m.group(1) != m.group(2):
            return False
    return True if seen else None


def write_latency(h: Host, dom: str) -> float:
    """Mean ms per 4 KiB write + fsync in the guest (100 in a row), agent overhead out."""
    from vmdr.hypervisor import connect

    loop = (f"i=0; while [ $i -lt {LAT_WRITES} ]; do dd if=/dev/zero of=/data/lat bs=4096 "
            "count=1 conv=fsync,notrunc 2>/dev/null; i=$((i+1)); done")
    base = (f"i=0; while [ $i -lt {LAT_WRITES} ]; do true; i=$((i+1)); done")
    hv = connect(h.uri)
    try:
        d = hv.lookup(dom)
        times = []
        for script in (base, loop):
            t0 = time.monotonic()
            r = d.guest_exec(["/bin/sh", "-c", script], timeout=300)
            if r.exitcode != 0:
                raise SystemExit(f"latency probe failed in the guest: {r.stderr}")
            times.append(time.monotonic() - t0)
        return max(0.0, (times[1] - times[0]) / LAT_WRITES * 1000)
    finally:
        hv.close()


def snapshot_window(h1: Host, g: Any, args: list[str], window: float) -> dict[str, Any]:
    samples: list[float] = []
    newest: float | None = None
    t_end = time.monotonic() + window
    next_cycle = time.monotonic()
    proc: subprocess.Popen[str] | None = None
    cycle_start = 0.0
    lat = None
    while time.monotonic() < t_end:
        now = time.monotonic()
        if proc is None and now >= next_cycle:
            cycle_start, next_cycle = now, next_cycle + 60
            proc = h1.popen(*PY, *args, "--json", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        if proc is not None and proc.poll() is not None:
            if proc.returncode == 0:
                newest = cycle_start  # the point holds the source as of the cycle's start
            proc = None
        if newest is not None:
            samples.append(now - newest)
        if lat is None and now > t_end - window / 2 and proc is None:
            lat = write_latency(h1, g.name)
        time.sleep(0.5)
    if proc is not None:
        proc.wait(300)
    return {"samples": samples, "latency_ms": lat}


def mirror_window(h1: Host, g: Any, args: list[str], window: float, sync: bool,
                  vmdir: Path) -> dict[str, Any]:
    extra = ["--sync"] if sync else ["--continuous"]
    p = h1.popen(*PY, *args, *extra, "--point-interval", "1m", "--for", f"{int(window + 300)}s",
                 "--json", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while in_step(h1, g.name) is not True:
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the mirror did not come into step")
            time.sleep(0.5)
        samples: list[float] = []
        last_ok = time.monotonic()
        t_end = last_ok + window
        lat = None
        aborted = 0
        while time.monotonic() < t_end:
            st = in_step(h1, g.name)
            now = time.monotonic()
            if st:
                last_ok = now
            elif st is None:
                aborted += 1
            samples.append(now - last_ok)
            if lat is None and now > t_end - window / 2:
                lat = write_latency(h1, g.name)
                continue
            time.sleep(0.5)
        return {"samples": samples, "latency_ms": lat, "no_job_samples": aborted,
                "state": json.loads((vmdir / "mirror.json").read_text()).get("state")}
    finally:
        h1.run(*PY, "replicate", "stop", g.name, check=False, timeout=120)
        p.wait(120)


def guest_dd(h: Host, dom: str, mib: int, seek_mib: int) -> float:
    """The guest rewrites ``mib`` MiB of vdb with random bytes (O_DIRECT); seconds taken."""
    from vmdr.hypervisor import connect

    hv = connect(h.uri)
    try:
        t0 = time.monotonic()
        r = hv.lookup(dom).guest_exec(
            ["/bin/dd", "if=/dev/urandom", "of=/dev/vdb", "bs=1M", f"count={mib}",
             f"seek={seek_mib}", "oflag=direct", "iflag=fullblock"], timeout=600)
        if r.exitcode != 0:
            raise SystemExit(f"dd in the guest failed: {r.stderr}")
        return time.monotonic() - t0
    finally:
        hv.close()


def cold(h: Host, *args: str) -> tuple[float, dict[str, Any]]:
    drop_caches()
    return timed(h, *args)


def at_size(image: Path) -> dict[str, Any]:
    """Point 1 with a 4 GiB data disk of real data (see the module docstring)."""
    if not image.exists():
        raise SystemExit(f"{image} is missing: build it with bench/vm_backup.py --runs 1")
    res: dict[str, Any] = {"image": str(image), "overlapped_logins": True}
    with Cluster(hosts=2, etcd=False, sshd=True) as c, \
            tempfile.TemporaryDirectory(prefix="vmdr-bench-rep-", dir="/var/tmp") as tmp:
        h1, h2 = c.hosts
        g = c.new_guest(local_to=h1, writer_rate=0)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(image),
                        str(g.data_disk)], check=True)
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
        t0 = time.monotonic()
        vmdr(h1, "backup", g.name)
        res["backup_full_s"] = time.monotonic() - t0
        res["restore_s"], _ = cold(h1, "restore", g.name, "--target-dir", f"{tmp}/restored",
                                   "--name", f"{g.name}-r")
        h1.virsh("undefine", f"{g.name}-r", check=False)
        subprocess.run(["rm", "-rf", f"{tmp}/restored"], check=True)
        common = ["replicate", g.name, "--to", to, "--dir", DR_ROOT, "--points", "5"]
        rcommon = ["replicate", g.name, "--to", to, "--dir", DR_ROOT + "-repo", "--feed",
                   "repository", "--points", "3", "--standby-name", f"{g.name}-rrepo"]
        res["seed_direct_s"], _ = cold(h1, *common)
        res["seed_repo_s"], _ = cold(h1, *rcommon)
        # the fixed cost: a cycle of each feed with nothing changed, an ssh round trip,
        # the CLI's start-up
        res["idle_direct_s"], r0 = cold(h1, *common)
        res["idle_direct_bytes"] = r0["results"][0]["bytes_moved"]
        vmdr(h1, "backup", g.name)
        res["idle_repo_s"], r0 = cold(h1, *rcommon)
        res["idle_repo_bytes"] = r0["results"][0]["bytes_moved"]
        ssh = []
        for _ in range(3):
            t0 = time.monotonic()
            h1.run(*c.ssh_command(h2), "true", timeout=60)
            ssh.append(time.monotonic() - t0)
        res["ssh_s"] = statistics.median(ssh)
        t0 = time.monotonic()
        h1.run(*PY, "--version", timeout=60)
        res["cli_start_s"] = time.monotonic() - t0
        # ~1 % of the data disk changes in the guest
        mib = max(1, round(res["data_virtual"] / (1 << 20) / 100))
        res["changed_mib"] = mib
        res["guest_dd_s"] = guest_dd(h1, g.name, mib, 1000)
        res["direct_s"], r = cold(h1, *common)
        res.update(direct_bytes=r["results"][0]["bytes_moved"], direct_mode=r["results"][0]["mode"],
                   disk_bytes=r["results"][0]["disk_bytes"])
        res["backup_inc_s"], _ = cold(h1, "backup", g.name)
        res["repo_s"], r = cold(h1, *rcommon)
        res.update(repo_bytes=r["results"][0]["bytes_moved"], repo_mode=r["results"][0]["mode"])
    return res


def profile_cycle(out: Path) -> None:
    """cProfile of one direct cycle with nothing changed (the fixed cost), small test VM."""
    with Cluster(hosts=2, etcd=False, sshd=True) as c, \
            tempfile.TemporaryDirectory(prefix="vmdr-bench-rep-", dir="/var/tmp") as tmp:
        h1, h2 = c.hosts
        g = c.new_guest(local_to=h1, writer_rate=0)
        g.start(h1)
        g.wait_heartbeat(180)
        os.environ.update(VMDR_LOCK_DIR=f"{tmp}/locks")
        to = c.ssh_uri(h2) + "&known_hosts=/dev/null"
        common = ["replicate", g.name, "--to", to, "--dir", DR_ROOT, "--points", "5"]
        vmdr(h1, *common)
        idle = []
        for _ in range(3):
            drop_caches()
            idle.append(timed(h1, *common)[0])
        print(json.dumps({"idle_direct_s": idle, "median": statistics.median(idle)}),
              flush=True)
        p = h1.run(sys.executable, "-m", "cProfile", "-o", str(out), "-m", "vmdr.cli.main",
                   *common, "--json", check=False, timeout=300)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-800:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=180.0, help="RPO window per mode, s")
    ap.add_argument("--at-size", action="store_true",
                    help="only the sync-vs-restore figure, with a 4 GiB data disk of real data")
    ap.add_argument("--image", type=Path, default=ROOT / "bench" / "work" / "image-4g.raw",
                    help="raw data-disk image for --at-size (bench/vm_backup.py builds it)")
    ap.add_argument("--profile-cycle", type=Path, metavar="FILE",
                    help="only cProfile one unchanged direct cycle into FILE")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    if a.profile_cycle:
        profile_cycle(a.profile_cycle.resolve())
        return
    if a.at_size:
        big = at_size(a.image)
        print(json.dumps(big, indent=1))
        (ROOT / "bench" / "work").mkdir(exist_ok=True)
        (ROOT / "bench" / "work" / "replica-size.json").write_text(json.dumps(big, indent=1))
        if not a.no_doc:
            replace_section(DOC, "replica-size", render_size(big), "Benchmarks")
        return
    res: dict[str, Any] = {"window_s": a.window}
    with Cluster(hosts=2, etcd=False, sshd=True) as c, \
            tempfile.TemporaryDirectory(prefix="vmdr-bench-rep-", dir="/var/tmp") as tmp:
        h1, h2 = c.hosts
        g = c.new_guest(local_to=h1, writer_rate=20)
        g.start(h1)
        g.wait_heartbeat(120)
        g.wait_writer(timeout=90)
        pw = Path(tmp) / "pw"
        pw.write_text("bench passphrase\n")
        pw.chmod(0o600)
        os.environ.update(VMDR_REPO=f"{tmp}/repo", VMDR_PASSWORD_FILE=str(pw),
                          VMDR_LOCK_DIR=f"{tmp}/locks")
        vmdr(h1, "repo", "init")
        to = c.ssh_uri(h2) + "&known_hosts=/dev/null"
        vmdir = h2.dir / "lib-libvirt" / "images" / "vmdr-replicas" / g.name

        # -- 1. sync after ~1 % changed vs a full restore -----------------------------------
        vmdr(h1, "backup", g.name)
        t_restore, _ = timed(h1, "restore", g.name, "--target-dir", f"{tmp}/restored",
                             "--name", f"{g.name}-r")
        common = ["replicate", g.name, "--to", to, "--dir", DR_ROOT, "--points", "5",
                  "--rpo", "2m"]
        seed_direct, _ = timed(h1, *common)
        rcommon = ["replicate", g.name, "--to", to, "--dir", DR_ROOT + "-repo", "--feed",
                   "repository", "--points", "3", "--standby-name", f"{g.name}-rrepo"]
        seed_repo, _ = timed(h1, *rcommon)
        # the writer's 4 KiB records at 20/s: 1 % of the 256 MiB data disk in ~33 s
        s0 = g.wait_writer(timeout=30)
        g.wait_writer(above=s0 + 655, timeout=120)
        t_direct, r_direct = timed(h1, *common)
        vmdr(h1, "backup", g.name)
        t_repo, r_repo = timed(h1, *rcommon)
        res.update(restore_s=t_restore, seed_direct_s=seed_direct, seed_repo_s=seed_repo,
                   direct_s=t_direct, direct_bytes=r_direct["results"][0]["bytes_moved"],
                   repo_s=t_repo, repo_bytes=r_repo["results"][0]["bytes_moved"],
                   disk_bytes=r_direct["results"][0]["disk_bytes"])
        print(json.dumps(res), flush=True)

        # -- 2./3. RPO and write latency per mode ------------------------------------------
        res["snapshot"] = snapshot_window(h1, g, common, a.window)
        res["mirror"] = mirror_window(h1, g, common, a.window, False, vmdir)
        res["sync"] = mirror_window(h1, g, common, a.window, True, vmdir)
        g.wait_writer(timeout=30)
    for k in ("snapshot", "mirror", "sync"):
        s = res[k].pop("samples")
        res[k].update(n=len(s), median_s=statistics.median(s) if s else None,
                      p95_s=pct(s, 0.95), max_s=max(s) if s else None)
    print(json.dumps(res, indent=1))
    if not a.no_doc:
        replace_section(DOC, "replica", render(res), "Benchmarks")


def render(r: dict[str, Any]) -> str:
    mib = 1 << 20
    w = r["window_s"]
    base = r["snapshot"]["latency_ms"] or 0.0

    def lat(k: str) -> str:
        v = r[k]["latency_ms"]
        if v is None:
            return "—"
        return f"{v:.1f} ms" + ("" if k == "snapshot" else f" (+{v - base:.1f} ms)")

    rows = [
        "| measure | vmdr | goal / limit | anchor |",
        "|---|---|---|---|",
        f"| full `vmdr restore` of the VM (64 MiB boot + 256 MiB data) | {r['restore_s']:.1f} s "
        "| baseline | — |",
        f"| replica sync after ~1 % of the data disk changed, direct feed (dirty bitmaps, ssh) "
        f"| {r['direct_s']:.1f} s = **{r['direct_s'] / r['restore_s']:.2f}×** restore, "
        f"{r['direct_bytes'] / mib:.1f} MiB moved | ≤ 0.2× restore | — |",
        f"| replica sync after ~1 % changed, repository feed (newest backup's changed chunks)"
        f" | {r['repo_s']:.1f} s = **{r['repo_s'] / r['restore_s']:.2f}×** restore, "
        f"{r['repo_bytes'] / mib:.1f} MiB moved | ≤ 0.2× restore | Veeam replica from "
        "backup |",
        f"| first sync (seed), direct / repository | {r['seed_direct_s']:.1f} s / "
        f"{r['seed_repo_s']:.1f} s | — | — |",
    ]
    for k, name, goal, anchor in (
            ("snapshot", "snapshot cycles every 60 s", "p95 ≤ 2 min", "SRM: 5 min minimum"),
            ("mirror", "continuous mirror (asynchronous)", "p95 ≤ 10 s",
             "Zerto: checkpoints every few s"),
            ("sync", "synchronous mirror", "0", "Zerto: seconds; sync: RPO 0")):
        m = r[k]
        rows.append(f"| achieved RPO, {name}, {w / 60:.0f}-minute window (not 30) | median "
                    f"{m['median_s']:.1f} s, **p95 {m['p95_s']:.1f} s**, max {m['max_s']:.1f} s "
                    f"({m['n']} samples) | {goal} | {anchor} |")
    rows.append(f"| guest write latency, 4 KiB write + fsync: snapshot cycles / async mirror / "
                f"sync mirror | {lat('snapshot')} / {lat('mirror')} / {lat('sync')} | state "
                "it | sync: one DR round trip per write |")
    return "\n".join([
        "## Replicas and continuous mirror (issue 11)",
        "",
        "`python bench/replica.py --window " f"{w:.0f}` under `flock /tmp/vmdr-heavy.lock`: two "
        "libvirt hosts in network namespaces on this machine (2 cores, TCG guests), the DR "
        "host reached over ssh on a veth bridge (no WAN latency: the sync cost is the "
        "local round trip through ssh and qemu-storage-daemon). A test-estate guest writes "
        "4 KiB records at 20/s throughout. RPO windows are "
        f"{w / 60:.0f} minutes per mode, **not the 30 minutes the issue asks** (machine "
        "time shared by 8 sessions); samples every 0.5 s. RPO of a mirror = time since "
        "libvirt last reported every block job in step; of snapshot cycles = age of the "
        "newest restore point (the source state at the cycle's start).",
        "",
        *rows,
        "",
        "Reading it: the **sync-vs-restore goal (≤ 0.2×) is not met at this size**. The "
        "test VM's disks are almost empty, so a full local restore reads little and takes "
        f"{r['restore_s']:.1f} s, while a replica cycle has a fixed cost of about 2 s "
        "whatever changed (ssh control master, the pull-backup job and its checkpoint, the "
        "NBD export at the DR host, the qcow2 restore point, the state file) and its data "
        "crosses ssh; it moves only the changed ranges (direct: dirty-bitmap extents; "
        "repository: whole 4 MiB chunks). The same figure with a 4 GiB data disk of real "
        "data is in the next section (`--at-size`): still not met there (about 0.3×). The "
        "RPO goals are met "
        "with a wide margin. The synchronous mirror's non-zero maximum is one sample taken "
        "while a guest write was in flight (libvirt reported cur < end for that instant). "
        "The write-latency cost is "
        "the price of RPO 0 over a local veth: over a WAN every synchronous write also "
        "pays the round-trip time.",
        "",
    ])


NAMES = {"direct": "direct", "repo": "repository"}


def render_size(r: dict[str, Any]) -> str:
    mib, gb = 1 << 20, 1e9
    base = r["restore_s"]

    def verdict(t: float) -> str:
        return "**met**" if t <= 0.2 * base else "**not met**"

    def part(feed: str) -> str:
        idle, t, moved = r[f"idle_{feed}_s"], r[f"{feed}_s"], r[f"{feed}_bytes"]
        rate = moved / mib / (t - idle) if t > idle else float("nan")
        return (f"{NAMES[feed]}: {idle:.1f} s fixed + {t - idle:.1f} s for {moved / mib:.1f} MiB "
                f"(≈ {rate:.0f} MiB/s)")

    def extra(feed: str) -> str:
        idle, t = r[f"idle_{feed}_s"], r[f"{feed}_s"]
        room = 0.2 * base - (t - idle)  # what 0.2x leaves for the fixed part, per 4 GiB
        if room <= 0:
            return f"{NAMES[feed]}: the changed bytes alone exceed 0.2× at any size"
        k = idle / room
        return (f"{NAMES[feed]}: ≤ 0.2× from about {k * r['data_virtual'] / (1 << 30):.0f} GiB of "
                "such data")

    rows = [
        "| measure | vmdr | goal | |",
        "|---|---|---|---|",
        f"| full `vmdr restore` of the VM (64 MiB boot + {r['data_virtual'] / (1 << 30):.0f} GiB "
        f"data, {r['data_allocated'] / gb:.2f} GB allocated), cold cache | {base:.1f} s "
        "| baseline | |",
        f"| replica sync after the guest rewrote {r['changed_mib']} MiB (1 %) of the data disk, "
        f"direct feed (dirty bitmaps, ssh), cold cache | {r['direct_s']:.1f} s = "
        f"**{r['direct_s'] / base:.2f}×** restore, {r['direct_bytes'] / mib:.1f} MiB moved "
        f"| ≤ 0.2× restore | {verdict(r['direct_s'])} |",
        f"| the same, repository feed (the incremental backup's changed chunks), cold cache "
        f"| {r['repo_s']:.1f} s = **{r['repo_s'] / base:.2f}×** restore, "
        f"{r['repo_bytes'] / mib:.1f} MiB moved | ≤ 0.2× restore | {verdict(r['repo_s'])} |",
        f"| incremental `vmdr backup` that feeds the repository cycle (not in the row above) "
        f"| {r['backup_inc_s']:.1f} s | — | |",
        f"| cycle with nothing changed (fixed cost), direct / repository | "
        f"{r['idle_direct_s']:.1f} s / {r['idle_repo_s']:.1f} s "
        f"({r['idle_direct_bytes'] / mib:.1f} / {r['idle_repo_bytes'] / mib:.1f} MiB moved) "
        "| — | |",
        f"| of which: one ssh round trip (connect, auth, `true`) / `vmdr --version` start-up "
        f"| {r['ssh_s']:.2f} s / {r['cli_start_s']:.2f} s | — | |",
        f"| first sync (seed), direct / repository, cold cache | {r['seed_direct_s']:.1f} s / "
        f"{r['seed_repo_s']:.1f} s | — | |",
    ]
    return "\n".join([
        "### Replica sync at a realistic size",
        "",
        "`python bench/replica.py --at-size --image bench/work/image-4g.raw` under `flock "
        "/tmp/vmdr-heavy.lock`, same harness as above (two libvirt hosts in network "
        "namespaces, the DR host over ssh on a veth bridge, TCG guest), writer off. The "
        "guest's data disk is bench/run.py's 4 GiB ext4 image (files from /usr/lib and "
        "/usr/share plus 300 MiB of random bytes, as in the VM backup bench) as qcow2; the "
        f"guest rewrites {r['changed_mib']} MiB of it itself (`dd if=/dev/urandom "
        "of=/dev/vdb oflag=direct` through the guest agent). Restore and cycles come from "
        "the same repository in the same run, page cache dropped before every timed "
        "command.",
        "",
        *rows,
        "",
        f"What a cycle is made of: {part('direct')}; {part('repo')}. The fixed part is the "
        f"same whatever the size: the CLI's start-up ({r['cli_start_s']:.2f} s), two ssh "
        f"logins to the DR host (libvirt's `qemu+ssh` connection and vmdr's control master, "
        f"{r['ssh_s']:.2f} s each on this harness), then libvirt's backup job and "
        "checkpoint, a `qemu-nbd` export per disk, a restore point (qcow2 internal "
        "snapshot) per disk, rotation and the state file, each a command over the control "
        "master."
        + ("" if r.get("overlapped_logins") else
           " These figures were taken before a cycle made its two ssh logins at the same "
           f"time (the fix that followed): expect about one login ({r['ssh_s']:.2f} s) "
           "less fixed cost; not re-measured at this size (the heavy lock was taken). On "
           "a loopback sshd the two logins took 0.86 s one after the other and 0.54 s "
           "overlapped (median of 5)."),
        "",
        f"Reading it: at this size the goal is {verdict(r['direct_s'])} for the direct feed "
        f"({r['direct_s'] / base:.2f}×) and {verdict(r['repo_s'])} for the repository feed "
        f"({r['repo_s'] / base:.2f}×). A cold full restore from a local "
        f"repository writes the {r['data_allocated'] / gb:.1f} GB in {base:.1f} s, so 0.2× is "
        f"{0.2 * base:.1f} s, about the fixed cost of one cycle alone. The cycles do read "
        "and move only the changes (direct: the dirty-bitmap extents; repository: the "
        "changed 4 MiB chunks of the incremental backup). Because the fixed part does not "
        "grow with the VM and the changed bytes grow with it, the ratio falls with size: "
        f"{extra('direct')}; {extra('repo')} (extrapolated from these figures, not "
        "measured).",
        "",
    ])


if __name__ == "__main__":
    main()
