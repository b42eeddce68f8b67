"""Fast detection versus false failovers (issue 10): the default [ha] settings against the
"busy cluster" settings of docs/operations.md, on the 3-host harness.

    flock /tmp/vmdr-bench.lock flock /tmp/vmdr-heavy.lock \\
        .venv/bin/python bench/ha_tradeoff.py [--stalls 2.5,5,9,13] [--kills 3] --json out.json

* stall: an etcd hiccup — two of the three etcd members are stopped (SIGSTOP) for D seconds,
  so no host can renew its lease (what an etcd leader election under load, a saturated
  NIC or a long pause does). A healthy HA guest runs on h2 throughout; the bench polls
  libvirt on every host every ~0.1 s: did the hiccup destroy it (a false failover: the
  host fenced itself), how long was it down, did it ever run twice.
* kill: ``kill -9`` of the host running the guest with the busy settings (the default
  settings' figures are bench/ha.py's), time to the start on a survivor.

bench/ha.py --tradeoff-json writes the result into its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

PROFILES = {
    "default": "",
    "busy": 'lease_ttl = "15s"\nlease_renew = "3s"\nself_fence_margin = "4s"\n',
}


def agent_rss_mib() -> dict[str, float]:
    """VmRSS of each harness agent process (``python -m vmdr.agent --config
    .../ha-agent-HOST.toml``), by host."""
    out: dict[str, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            status = (d / "status").read_text()
        except OSError:
            continue
        if b"vmdr.agent" not in cmd or not any(b"ha-agent-" in c for c in cmd):
            continue
        cfg = next(c for c in cmd if b"ha-agent-" in c).decode()
        host = cfg.rsplit("ha-agent-", 1)[1].removesuffix(".toml")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[host] = int(line.split()[1]) / 1024
    return out


def run(stalls: list[float], kills: int, save: Any,
        profiles: list[str] | None = None) -> dict[str, Any]:
    from ha import Timeline
    from tests.multihost.cluster import Cluster
    from tests.multihost.test_ha_agents import Agents, agent_config, running_on

    class ProfileAgents(Agents):
        def __init__(self, *a: Any, ha_extra: str, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.ha_extra = ha_extra

        def start(self, h: Any) -> None:
            cfg = agent_config(self.cluster, h, self.prefix, self.guests, **self.opts)
            cfg.write_text(cfg.read_text().replace("[ha]\n", "[ha]\n" + self.ha_extra, 1))
            log = open(self.shared / f"ha-agent-{h.name}.log", "ab")  # noqa: SIM115
            self.procs[h.name] = h.popen(sys.executable, "-m", "vmdr.agent", "--config",
                                         str(cfg), env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    out: dict[str, Any] = {"stall": [], "kill": [], "agent_rss_mib": {}}
    with Cluster(hosts=3, etcd=True) as cluster:
        assert cluster.etcd is not None
        h1, h2, h3 = cluster.hosts
        for profile, extra in PROFILES.items():
            if profiles and profile not in profiles:
                continue
            g = cluster.new_guest(writer_rate=0)
            g.known.update(cluster.hosts)
            agents = ProfileAgents(cluster, {"db": g, "app": g}, app_ha=False, ha_extra=extra,
                                   extra_vm={"db": 'hosts = ["h2", "h3"]'})
            try:
                agents.start(h1)
                agents.wait_leader("h1")
                agents.start(h2)
                agents.start(h3)
                g.start(h2)
                g.wait_heartbeat(120)

                def settle(agents: Any = agents, g: Any = g) -> None:
                    cluster.etcd.wait_healthy(60)  # type: ignore[union-attr]
                    for h in cluster.hosts:
                        agents.wait_member(h.name, 60)
                    deadline = time.monotonic() + 120
                    while len(running_on(cluster, g)) != 1:
                        assert time.monotonic() < deadline, agents.logs()
                        time.sleep(0.5)
                    g.wait_heartbeat(120)
                    agents.wait_published(g.name, running_on(cluster, g)[0], 60)
                    time.sleep(3)  # a few renewals at the steady pace

                for d in stalls:
                    settle()
                    where = running_on(cluster, g)[0]
                    tl = Timeline(cluster, {"db": g}, set())
                    stopped = sorted(cluster.etcd.procs)[:2]  # no quorum
                    for n in stopped:
                        os.kill(cluster.etcd.procs[n].pid, signal.SIGSTOP)
                    try:
                        while time.time() - tl.t0 < d:
                            tl.poll()
                            time.sleep(0.1)
                    finally:
                        for n in stopped:
                            os.kill(cluster.etcd.procs[n].pid, signal.SIGCONT)
                    # then until it runs again after an outage, or 30 s without one
                    while time.time() - tl.t0 < d + 150:
                        tl.poll()
                        runs = tl.runs["db"]
                        down = any(not hs for _t, hs in runs)
                        if not down and time.time() - tl.t0 > d + 30:
                            break
                        if down and runs[-1][1]:
                            break
                        time.sleep(0.1)
                    runs = tl.runs["db"]
                    gone = next((t for t, hs in runs if not hs), None)
                    back = next((t for t, hs in runs if hs and gone is not None and t > gone),
                                None)
                    evs = [e for e in agents.events() if e["time"] >= tl.t0 - 1]
                    r = {"profile": profile, "stall_s": d, "host": where,
                         "destroyed_at_s": gone, "running_again_s": back,
                         "running_on": runs[-1][1], "double": bool(tl.doubles),
                         "events": sorted({e["kind"] for e in evs}),
                         "decisions": [(round(e["time"] - tl.t0, 2), e["kind"], e["host"],
                                        e["vm"], e["reason"]) for e in evs]}
                    out["stall"].append(r)
                    save(out)
                    print(f"{profile}: etcd stall {d:g}s: "
                          + (f"guest destroyed at {gone:.1f}s, running again at "
                             f"{back if back is None else round(back, 1)}s on {runs[-1][1]}"
                             if gone is not None else "guest kept running")
                          + f", double={bool(tl.doubles)}, events {r['events']}", flush=True)
                if profile == "busy":
                    for i in range(kills):
                        settle()
                        victim = cluster.host(running_on(cluster, g)[0])
                        if victim is h1:  # never the leader's host here
                            break
                        tl = Timeline(cluster, {"db": g}, {victim.name})
                        victim.kill()
                        while "db" not in tl.beats and time.time() - tl.t0 < 180:
                            tl.poll()
                            time.sleep(0.1)
                        k = {"profile": profile, "start_s": tl.starts.get("db"),
                             "heartbeat_s": tl.beats.get("db"), "victim": victim.name,
                             "double": bool(tl.doubles)}
                        out["kill"].append(k)
                        save(out)
                        print(f"{profile}: kill {i + 1} ({victim.name}): start "
                              f"{k['start_s']}s, heartbeat {k['heartbeat_s']}s", flush=True)
                        victim.start()
                        agents.start(victim)
                        agents.wait_member(victim.name, 60)
                out["agent_rss_mib"][profile] = agent_rss_mib()
                save(out)
            except AssertionError as exc:  # the guest did not come back: say so, go on
                out.setdefault("aborted", {})[profile] = str(exc).splitlines()[0][:300]
                save(out)
            finally:
                agents.stop()
                for h in cluster.hosts:
                    src = agents.shared / f"ha-agent-{h.name}.log"
                    if src.exists() and os.environ.get("HA_TRADEOFF_LOGS"):
                        Path(os.environ["HA_TRADEOFF_LOGS"] + f"-{profile}-{h.name}.log") \
                            .write_text(src.read_text(errors="replace"))
                for h in cluster.hosts:
                    g.destroy(h)
                cluster.ensure_healthy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stalls", default="2.5,5,9,13")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--profiles", default="", help="e.g. default (all if empty)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    res: dict[str, Any] = {"git": git,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save(o: dict[str, Any]) -> None:
        Path(a.json).write_text(json.dumps({**res, **o}, indent=1))
    out = run([float(x) for x in a.stalls.split(",")], a.kills, save,
              [p for p in a.profiles.split(",") if p])
    save(out)
    print(json.dumps({**res, **out}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("VMDR_INSECURE_TEST_KDF", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # agents' logs
    main()
