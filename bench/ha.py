"""Host failover figures (issue 10): kill -9 to start and to heartbeat, partitions without
a double run, boot order, and the 50 hosts × 40 VMs scale case.

    flock /tmp/vmdr-heavy.lock .venv/bin/python bench/ha.py [--kills 10] [--partitions 20]
        [--scale-only] [--no-scale] [--json out.json]

* kill: the 3-host harness (tests/multihost) with a real agent in each host against the
  three-member etcd, default [ha] settings. One HA guest on shared storage runs on a
  non-leader host; ``kill -9`` of every process of that host; the time until libvirt on a
  survivor reports the guest running (polled every 0.1 s over the hosts' unix sockets) and
  until its first heartbeat on the console. The host is then rebooted with its agent and
  the next trial kills the host the guest now runs on.
* partition: two HA guests, db (group 1, ready = guest-agent ping + 1 s) and app (group 2,
  depends on db). Each trial cuts the veths of the host(s) running them; libvirt on all
  three hosts is polled every 0.1 s (a double run fails the trial), the leader's events
  give the boot order (app started ≥ db ready + 1 s), and after the last trial db's record
  stream must be one consistent history. Then the hosts heal and rejoin.
* scale: 50 etcd members' worth of agents (EtcdCoordinator each, real leases) over
  FakeFleet against a real one-member etcd on loopback, 40 HA VMs per host; one host stops
  renewing; the leader's placement time, the time until all 40 starts are issued, etcd
  requests, and the leader process's RSS.

Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from _util import machine, replace_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


# -- scale --------------------------------------------------------------------------------
def scale(hosts: int = 50, per_host: int = 40) -> dict[str, Any]:
    from tests.integration.agent_services import Etcd

    from vmdr.agent.coord import Member
    from vmdr.agent.coord_etcd import EtcdCoordinator, wait_for
    from vmdr.agent.ha_runtime import LibvirtOps
    from vmdr.ha.leader import HALeader, LiveHost
    from vmdr.ha.model import HAVM, HAPolicy, Readiness
    from vmdr.ha.settings import HASettings
    from vmdr.ha.store import HAStore
    from vmdr.hypervisor.fake import FakeFleet

    etcd = Etcd(1)
    try:
        wait_for(etcd.endpoints)
        prefix = "/vmdr-bench-ha/"
        names = [f"host{i:02d}" for i in range(1, hosts + 1)]
        fleet = FakeFleet()
        uris = {h: f"fake://{h}/system" for h in names}
        vms: dict[str, HAVM] = {}
        for i, h in enumerate(names):
            fh = fleet.host(uris[h])
            for j in range(per_host):
                vm = f"vm{i:02d}-{j:02d}"
                # three priority groups; a fake guest is ready once started
                vms[vm] = HAVM(vm, 1 + j % 3, ready=Readiness("none", 0.0, 60.0))
                fh.add_domain(f"<domain><name>{vm}</name><memory unit='KiB'>1048576"
                              "</memory><vcpu>1</vcpu></domain>", active=True)
        policy = HAPolicy(HASettings(), vms, dict.fromkeys(names), cpu_overcommit=4.0)
        coords = {h: EtcdCoordinator(etcd.endpoints, 5, prefix) for h in names}
        store = HAStore.for_coordinator(EtcdCoordinator(etcd.endpoints, 5, prefix), "host01")
        members = {h: Member(h, "", 64, 256 * 1024,
                             [f"vm{i:02d}-{j:02d}" for j in range(per_host)])
                   for i, h in enumerate(names)}
        for h in names:
            coords[h].tick(members[h], time.time())
        stop, dead = threading.Event(), threading.Event()
        victim = names[-1]

        def renew() -> None:  # every agent renews its lease each second; the victim stops
            while not stop.wait(1.0):
                for h in names:
                    if h != victim or not dead.is_set():
                        coords[h]._lease.refresh()
        th = threading.Thread(target=renew, daemon=True)
        th.start()
        t0 = time.monotonic()
        for vm in vms:  # every agent publishes its HA VMs (the first publish)
            host = names[int(vm[2:4])]
            store.put_domain(vm, fleet.host(uris[host]).domains[vm].inactive_xml, host)
        publish_s = time.monotonic() - t0
        dead.set()
        time.sleep(1.5)  # the renewal thread has seen it
        coords[victim]._lease.refresh()  # the victim's last renewal: now
        fleet.hosts[uris[victim]].up = False
        t_dead = time.monotonic()
        leader = HALeader(policy, store, LibvirtOps(uris, fleet.connect), "host01")
        reader = EtcdCoordinator(etcd.endpoints, 5, prefix)  # the leader's own client
        reqs0 = store.kv.requests
        seen = set(names)
        started_all = None
        detected = None
        while time.monotonic() - t_dead < 60:
            live = {m.host: LiveHost(m.host, m.cpus, m.memory_mib, tuple(m.running_vms))
                    for m in reader.read_members()}
            ts = time.monotonic()
            leader.step(time.time(), live, seen)
            if os.environ.get("HA_BENCH_DEBUG"):
                print(f"{time.monotonic() - t_dead:.1f} live={len(live)} "
                      f"step={time.monotonic() - ts:.2f}s records={list(store.failovers())}")
            rec = store.failover(victim)
            if rec and detected is None:
                detected = time.monotonic()
            if rec and len(rec["started"]) + len(rec.get("failed", {})) >= per_host:
                started_all = time.monotonic()
                break
            time.sleep(0.25)
        stop.set()
        th.join(3)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"hosts": hosts, "vms": hosts * per_host,
                "publish_s": publish_s,
                "detected_after_s": (detected - t_dead) if detected else None,
                "placement_s": max(leader.placement_s) if leader.placement_s else None,
                "all_started_after_detect_s": (started_all - detected)
                if started_all and detected else None,
                "failover_requests": store.kv.requests - reqs0,
                "publish_requests": hosts * per_host * 2,
                "rss_mib": rss / 2**20}
    finally:
        etcd.stop()


# -- the harness --------------------------------------------------------------------------
class Timeline:
    """Polls after a failure (each ~0.1 s): where each guest runs (a second copy is a double
    run), when it first runs on a host other than ``away`` and when its console first shows
    a heartbeat of that new boot. The console log is truncated by each start (``append =
    'off'``), so a boot's heartbeats count only once the log has shrunk below the largest
    size seen since the failure (libvirt may report the domain active a moment before it
    truncates the log)."""

    def __init__(self, cluster: Any, guests: dict[str, Any], away: set[str]) -> None:
        from tests.multihost.test_ha_agents import running_on

        self.cluster, self.guests, self.away = cluster, guests, away
        self._running_on = running_on
        self.t0 = time.time()
        self.runs: dict[str, list[tuple[float, list[str]]]] = {n: [] for n in guests}
        self.starts: dict[str, float] = {}
        self.beats: dict[str, float] = {}
        self.doubles: list[tuple[float, str, list[str]]] = []
        self._max = {n: self._size(g) for n, g in guests.items()}
        self._fresh: set[str] = set()

    @staticmethod
    def _size(g: Any) -> int:
        try:
            return int(g.console_log.stat().st_size)
        except FileNotFoundError:
            return 0

    def poll(self) -> None:
        for n, g in self.guests.items():
            t = time.time()
            hosts = self._running_on(self.cluster, g)
            if not self.runs[n] or self.runs[n][-1][1] != hosts:
                self.runs[n].append((t - self.t0, hosts))
            if len(hosts) > 1:
                self.doubles.append((t - self.t0, n, hosts))
            if n not in self.starts and hosts and hosts[0] not in self.away:
                self.starts[n] = t - self.t0
            size = self._size(g)
            if size < self._max[n]:
                self._fresh.add(n)
            self._max[n] = max(self._max[n], size)
            if n in self.starts and n in self._fresh and n not in self.beats \
                    and g.heartbeats():
                self.beats[n] = time.time() - self.t0

    def up_elsewhere(self) -> bool:
        return all(n in self.starts and self.runs[n][-1][1]
                   and self.runs[n][-1][1][0] not in self.away for n in self.guests)

    def as_dict(self) -> dict[str, Any]:
        return {"t0": self.t0, "starts": self.starts, "beats": self.beats,
                "doubles": self.doubles, "runs": self.runs}


def harness(kills: int, partitions: int, save: Any = None) -> dict[str, Any]:
    """The trials on the harness; ``save(out)`` after each (partial results survive)."""
    from _ha_order import Rule, judge_order, leader_events_order
    from tests.guest.records import check_records
    from tests.multihost.cluster import Cluster
    from tests.multihost.test_ha_agents import Agents, running_on

    out: dict[str, Any] = {"kill": [], "partition": [], "double_runs": 0, "order_ok": 0,
                           "order_trials": 0, "stalls": 0}
    with Cluster(hosts=3, etcd=True) as cluster:
        h1, h2, h3 = cluster.hosts
        if kills:
            g = cluster.new_guest(writer_rate=0)
            g.known.update(cluster.hosts)
            guests = {"db": g, "app": g}  # app is not under HA here
            agents = Agents(cluster, guests, extra_vm={"db": 'hosts = ["h2", "h3"]'},
                            app_ha=False)
            try:
                agents.start(h1)
                agents.wait_leader("h1")
                agents.start(h2)
                agents.start(h3)
                g.start(h2)
                g.wait_heartbeat(120)
                for i in range(kills):
                    victim = cluster.host(running_on(cluster, g)[0])
                    agents.wait_published(g.name, victim.name)
                    tl = Timeline(cluster, {"db": g}, {victim.name})
                    victim.kill()
                    while "db" not in tl.beats and time.time() - tl.t0 < 180:
                        tl.poll()
                        time.sleep(0.1)
                    assert "db" in tl.beats, agents.logs()
                    out["double_runs"] += int(bool(tl.doubles))
                    k = {"start_s": tl.starts["db"], "heartbeat_s": tl.beats["db"],
                         "victim": victim.name, "double": bool(tl.doubles)}
                    out["kill"].append(k)
                    if save:
                        save(out)
                    print(f"kill {i + 1} ({victim.name}): start {k['start_s']:.1f}s, "
                          f"heartbeat {k['heartbeat_s']:.1f}s", flush=True)
                    victim.start()
                    agents.start(victim)
                    agents.wait_member(victim.name)
            finally:
                agents.stop()
                cluster.ensure_healthy()
        if partitions:
            guests = {"db": cluster.new_guest(writer_rate=20),
                      "app": cluster.new_guest(writer_rate=0)}
            for g in guests.values():
                g.known.update(cluster.hosts)
            delay = 1.0
            agents = Agents(cluster, guests, ready_delay=delay)
            rules = {"db": Rule(1, (), delay), "app": Rule(2, ("db",), 0.0)}
            try:
                agents.start(h1)
                agents.wait_leader("h1")
                agents.start(h2)
                agents.start(h3)
                for g in guests.values():
                    g.start(h2)
                for g in guests.values():
                    g.wait_heartbeat(120)
                for i in range(partitions):
                    deadline = time.monotonic() + 90
                    while not all(running_on(cluster, g) for g in guests.values()):
                        assert time.monotonic() < deadline, agents.logs()
                        time.sleep(0.5)
                    cut = sorted({running_on(cluster, g)[0] for g in guests.values()})
                    for name in cut:
                        for g in guests.values():
                            if running_on(cluster, g) == [name]:
                                agents.wait_published(g.name, name)
                    tl = Timeline(cluster, guests, set(cut))
                    for name in cut:
                        cluster.host(name).partition()
                    # until both run elsewhere and both heartbeat (at most 120 s)
                    while time.time() - tl.t0 < 120 and not (
                            tl.up_elsewhere() and len(tl.beats) == len(guests)):
                        tl.poll()
                        time.sleep(0.1)
                    up = tl.up_elsewhere()
                    t_up = max(tl.starts.values()) if up else None
                    evs = agents.events()
                    v = judge_order(rules, tl.starts, {n: b for n, b in tl.beats.items()})
                    old = leader_events_order(evs, guests["db"].name, guests["app"].name,
                                              delay, tl.t0 - 1)
                    double = bool(tl.doubles)
                    out["double_runs"] += int(double)
                    if v.ok is None:
                        out["stalls"] += 1
                    else:
                        out["order_trials"] += 1
                        out["order_ok"] += int(v.ok)
                    lead = {e["kind"] + ":" + next(n for n, g in guests.items()
                                                   if g.name == e["vm"]): e["time"] - tl.t0
                            for e in reversed(evs) if e["time"] >= tl.t0 - 1
                            and e["kind"] in ("started", "ready")
                            and e["vm"] in {g.name for g in guests.values()}}
                    out["partition"].append({
                        "cut": cut, "both_running_s": t_up, "double": double,
                        "order": v.as_dict(), "order_by_leader_events": old,
                        "leader": lead, **tl.as_dict()})
                    if save:
                        save(out)
                    print(f"partition {i + 1} ({','.join(cut)}): both up elsewhere after "
                          f"{t_up if t_up is None else round(t_up, 1)}s, starts "
                          f"{ {n: round(x, 1) for n, x in tl.starts.items()} }, beats "
                          f"{ {n: round(x, 1) for n, x in tl.beats.items()} }, "
                          f"double={double}, order={v.ok} {v.problems} "
                          f"(leader events: {old})", flush=True)
                    for name in cut:
                        cluster.host(name).heal()
                    for name in cut:
                        agents.wait_member(name)
                    guests["db"].wait_heartbeat(60)
            finally:
                agents.stop()
            for g in guests.values():
                for h in cluster.hosts:
                    g.destroy(h)
            rc = check_records(guests["db"].data_disk, "qcow2")
            out["records_consistent"] = rc.consistent
            out["records_last_seq"] = rc.last_seq
            out["records_problems"] = list(rc.problems)[:5]
    return out


def _stats(xs: list[float]) -> str:
    if not xs:
        return "not run"
    return f"median {statistics.median(xs):.1f} s, max {max(xs):.1f} s (n={len(xs)})"


VSPHERE = "vSphere HA: a host is declared failed after 15 s without heartbeats [1]"
PROXMOX = "Proxmox VE HA: ~2 min detection and failover [2]"
SOURCES = [
    "[1] VMware vSphere Availability, \"Failure Detection and Host Network Isolation\": "
    "https://vdc-repo.vmware.com/vmwb-repository/dcr-public/97a70553-ab7e-47fb-b797-"
    "3f380c7577d7/d71b7555-424e-41bb-a4c2-c5b9b7d7cdef/GUID-8CB28754-837E-446F-94FD-"
    "26F2DC09D3EA.html",
    "[2] Proxmox VE Administration Guide, High Availability (\"typical error detection and "
    "failover times of about 2 minutes\"; no restart ordering, no admission control): "
    "https://pve.proxmox.com/pve-docs/chapter-ha-manager.html",
]


def rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    h = res.get("harness") or {}
    s = res.get("scale") or {}
    kills = h.get("kill", [])
    parts = h.get("partition", [])
    n_par = len(parts)
    ups = [p["both_running_s"] for p in parts if p.get("both_running_s") is not None]
    beats = [p["beats"]["db"] for p in parts if "db" in p.get("beats", {})]
    boots = [k["heartbeat_s"] - k["start_s"] for k in kills]
    out = [
        ("kill -9 → start on a survivor", _stats([k["start_s"] for k in kills]),
         "≤ 10 s", f"{VSPHERE}; {PROXMOX}"),
        ("kill -9 → guest heartbeat", _stats([k["heartbeat_s"] for k in kills])
         + (f"; heartbeat − start: median {statistics.median(boots):.1f} s, max "
            f"{max(boots):.1f} s (the guest's own boot after the restart)" if boots else ""),
         "≤ start + the guest's boot", "—"),
        ("double runs (kill and partition trials, libvirt polled every ~0.1 s)",
         f"{h.get('double_runs', 0)} in {len(kills) + n_par} trials "
         f"({n_par} partitions)" if parts or kills else "not run",
         "0, in ≥ 20 partition trials", "Proxmox: watchdog self-fence [2]"),
        ("partition → db and app both running elsewhere", _stats(ups)
         + (f"; {h.get('stalls', 0)} not within 120 s" if h.get("stalls") else ""),
         "—", "—"),
        ("partition → db heartbeat", _stats(beats), "—", "—"),
        ("boot order (app ≥ db heartbeat + 1 s, real times)",
         f"{100 * h['order_ok'] / h['order_trials']:.0f} % ({h['order_ok']}/"
         f"{h['order_trials']})" if h.get("order_trials") else "not run", "100 %",
         "Proxmox: no ordering [2]"),
        ("db's record stream after all partitions",
         (f"one consistent history (last seq {h.get('records_last_seq')})"
          if h.get("records_consistent") else
          f"INCONSISTENT: {h.get('records_problems')}")
         if "records_consistent" in h else "not run", "one consistent history", "—"),
    ]
    if s:
        per = s["vms"] // s["hosts"]
        out += [
            (f"scale {s['hosts']} hosts × {per} VMs: placement of the failed host's "
             f"{per} VMs", f"{s['placement_s']:.3f} s", "≤ 1 s", "—"),
            ("scale: last lease renewal → failover recorded",
             f"{s['detected_after_s']:.1f} s", "≤ lease TTL + 1 s (6 s)", "—"),
            (f"scale: all {per} starts issued, after detection",
             f"{s['all_started_after_detect_s']:.1f} s (incl. the 2 s fence delay)", "—",
             "—"),
            ("scale: etcd requests of the failover (leader)", f"{s['failover_requests']}",
             "—", "—"),
            (f"scale: etcd requests to publish {s['vms']:,} domains",
             f"{s['publish_requests']} ({s['publish_s']:.1f} s)", "—", "—"),
            ("scale: RSS of the bench process (50 coordinators + leader + FakeFleet)",
             f"{s['rss_mib']:.0f} MiB", "—", "—"),
        ]
    rss = (res.get("tradeoff") or {}).get("agent_rss_mib") or {}
    vals = [v for per in rss.values() for v in per.values()]
    if vals:
        out.append(("RSS of a real agent with HA on the harness (`python -m vmdr.agent`, "
                    "the leader included; bench/ha_tradeoff.py run)",
                    (f"{min(vals):.0f}–{max(vals):.0f}" if round(min(vals)) != round(max(vals))
                     else f"{min(vals):.0f}") + f" MiB (n={len(vals)})", "—", "—"))
    return out


def _fmt_s(x: float | None) -> str:
    return "none in this run" if x is None else f"{x:g} s"


def _edge(by: dict[tuple[str, float], dict[str, Any]], stalls: list[float], profile: str,
          fenced: bool) -> float | None:
    """The shortest stall that fenced (``fenced``) or the longest that did not."""
    xs = [d for d in stalls if (profile, d) in by
          and (by[(profile, d)]["destroyed_at_s"] is not None) == fenced]
    return (min(xs) if fenced else max(xs)) if xs else None


def tradeoff_block(t: dict[str, Any] | None, res: dict[str, Any]) -> list[str]:
    """Fast detection versus false failovers, from bench/ha_tradeoff.py's JSON."""
    if not t:
        return ["**Fast detection versus false failovers.** Not measured. The defaults "
                "detect a dead host after the 5 s lease (+ 2 s fence delay); a host that "
                "cannot renew for 3.5 s fences itself even if healthy. The \"busy "
                "cluster\" settings of docs/operations.md (lease 15 s, renewal 3 s, margin "
                "4 s) need an 11 s hiccup to fence and detect ~10 s later: figures from the "
                "timing argument in `src/vmdr/ha/settings.py`, not from a run."]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "not run"
        dbl = " — RAN TWICE" if r["double"] else ""
        if r["destroyed_at_s"] is None:
            return f"kept running on {r['host']}{dbl}"
        back = r["running_again_s"]
        return (f"fenced: destroyed at {r['destroyed_at_s']:.1f} s, running again "
                + (f"at {back:.1f} s on {', '.join(r['running_on'])}" if back is not None
                   else "NOT within the window") + dbl)

    stalls = sorted({r["stall_s"] for r in t["stall"]})
    by = {(r["profile"], r["stall_s"]): r for r in t["stall"]}
    h = res.get("harness") or {}
    busy_kills = [k["start_s"] for k in t.get("kill", []) if k.get("start_s") is not None]
    out = ["**Fast detection versus false failovers** (`bench/ha_tradeoff.py`, a separate "
           f"run on git {t.get('git', '?')}, {t.get('date', '?')}). An etcd hiccup: two of "
           "the three etcd members stopped (SIGSTOP) for the time shown, so no host can "
           "renew its lease; a healthy HA guest runs on h2 throughout (time from the start "
           "of the hiccup):", "",
           "| etcd without quorum for | default: lease 5 s, renew 1.5 s, self-fence after "
           "3.5 s | busy cluster: lease 15 s, renew 3 s, self-fence after 11 s |",
           "|---|---|---|"]
    out += [f"| {d:g} s | {cell(by.get(('default', d)))} | {cell(by.get(('busy', d)))} |"
            for d in stalls]
    out += [f"| kill -9 → start on a survivor | {_stats([k['start_s'] for k in h.get('kill', [])])}"
            f" (main run) | {_stats(busy_kills)} |", "",
            *[f"{p}: the longest hiccup ridden out {_fmt_s(_edge(by, stalls, p, False))}, "
              f"the shortest that fenced the guest {_fmt_s(_edge(by, stalls, p, True))}."
              for p in ("default", "busy") if any(k[0] == p for k in by)],
            "", "A host cannot tell \"etcd is down\" from \"I am cut off\": an etcd outage "
            "longer than the self-fence time (defaults 3.5 s, busy settings 11 s) restarts "
            "every HA VM."]
    if t.get("note"):
        out += ["", str(t["note"])]
    return out


def write(res: dict[str, Any]) -> None:
    h = res.get("harness") or {}
    parts = h.get("partition", [])
    body = ["## High availability: host failover (bench/ha.py)", "",
            f"Machine: {machine()}. One run of `bench/ha.py` on git {res.get('git', '?')} "
            f"({res.get('date', '?')}): every row below comes from it. Default [ha] "
            "settings (lease 5 s, self-fence after 3.5 s without renewal, fence delay "
            "2 s); guests boot under TCG.", "",
            "| measure | figure | limit (issue 10) | anchor |", "|---|---|---|---|"]
    body += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(res)]
    if parts:
        old = sum(1 for p in parts if p.get("order_by_leader_events"))
        bad = [f"trial {i + 1} ({','.join(p['cut'])}): {'; '.join(p['order']['problems'])}"
               for i, p in enumerate(parts) if p["order"]["ok"] is not True]
        cuts = Counter("+".join(p["cut"]) for p in parts)
        body += ["", "Partition trials cut the host(s) running db and app: "
                 + ", ".join(f"{n} × {c}" for c, n in sorted(cuts.items()))
                 + ". The leader's own events agreed with the real-time order in "
                 f"{old} of {len(parts)} trials."
                 + (f" Not ok: {' | '.join(bad)}." if bad else "")]
    note = res.get("note")
    if note:
        body += ["", note]
    body += ["", *tradeoff_block(res.get("tradeoff"), res),
             "", "### Method", "",
             "`bench/ha.py` on the 3-host harness of tests/multihost (each host its own "
             "network, mount and UTS namespaces, libvirtd, virtlogd, virtlockd; a "
             "three-member etcd in namespaces of its own; guests on a shared directory). "
             "A real `python -m vmdr.agent` runs in each host. Every ~0.1 s after a failure "
             "the bench asks libvirt on all three hosts (over their unix sockets) where "
             "each guest runs — two at once is a double run — and reads each guest's "
             "console log; a start is the first poll that sees the guest running on a "
             "survivor, a heartbeat the first poll that sees a `VMDR-HEARTBEAT` line of "
             "that new boot. *kill*: `kill -9` of every process of the host running the "
             "guest (never the leader's, so the figure is the plain failover path; the "
             "multihost test also kills the leader's host); the host is then rebooted "
             "with its agent. *partition*: the veths of the host(s) running db (group 1, "
             "ready = guest-agent ping + 1 s) and app (group 2, depends on db) go down; "
             "the trial ends when both run elsewhere and both heartbeat (≤ 120 s), then "
             "the hosts heal. *boot order* (`bench/_ha_order.py`, unit-tested in "
             "tests/unit/test_ha_bench_order.py): each restarted VM's start against the "
             "heartbeat + delay of every VM of an earlier group and of its dependencies, "
             "with 0.5 s for the polls and the agent answering before the console "
             "heartbeat; a trial whose VMs were not both restarted within 120 s is a "
             "stall, counted apart. *records*: db writes sequence-numbered records at "
             "20/s throughout; after the last trial `tests/guest/records.py` checks the "
             "area is one history (no gap, no fork). *scale*: 50 `EtcdCoordinator`s with "
             "real leases against a one-member etcd on loopback, 2,000 HA VMs on "
             "FakeFleet in three priority groups (readiness `none`), one host stops "
             "renewing; placement time is the leader's `failover_plan` call; the "
             "failover's requests are the leader's HA store requests from the victim's "
             "last renewal to the last start (its 0.25 s polls included, member reads "
             "excluded).", "", "Sources:", ""] + [f"* {x}" for x in SOURCES]
    replace_section(DOC, "ha", "\n".join(body) + "\n", "Benchmarks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--partitions", type=int, default=20)
    ap.add_argument("--no-scale", action="store_true")
    ap.add_argument("--scale-only", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--json")
    ap.add_argument("--from-json", help="write the doc section from a saved (partial) run")
    ap.add_argument("--tradeoff-json", help="bench/ha_tradeoff.py's result, for the doc")
    a = ap.parse_args()
    if a.from_json:
        saved: dict[str, Any] = json.loads(Path(a.from_json).read_text())
        if a.note:
            saved["note"] = a.note
        if a.tradeoff_json:
            saved["tradeoff"] = json.loads(Path(a.tradeoff_json).read_text())
        write(saved)
        return
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    res: dict[str, Any] = {"note": a.note, "git": git,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save(h: dict[str, Any]) -> None:
        if a.json:
            Path(a.json).write_text(json.dumps({**res, "harness": h}, indent=1))
    if not a.no_scale:
        res["scale"] = scale()
        print(json.dumps(res["scale"], indent=1), flush=True)
    if not a.scale_only:
        res["harness"] = harness(a.kills, a.partitions, save)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    write(res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("VMDR_INSECURE_TEST_KDF", "1")
    main()
