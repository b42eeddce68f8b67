"""libvirtd alone dies (issue 10, "Real components in the tests"), on the 3-host harness.

``kill -9`` of the libvirtd of the host running an HA guest: its QEMU runs on and the
host's agent renews its lease, so this is no host failure. For longer than lease +
fence delay: the guest runs on its host only (libvirt of the other hosts polled every
0.2 s, the QEMU process on its own host followed by pid), no ``fenced``, ``self-fenced``
or ``started`` event, the guest's writer goes on; the agent reports libvirt unreachable
(one ``detected`` event). Once libvirtd is restarted (systemd would), the agent reports it
back and ``ha status`` shows the guest on its host. Then libvirtd dies again and the
host is cut off: the agent kills the guest's QEMU by libvirt's pid file (libvirt cannot
destroy it) before the leader restarts it elsewhere; never two at once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.hosts import Host
from tests.multihost.test_ha_agents import ROOT, Agents, agent_config, running_on

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.etcd]
DEAD_S = 15.0  # > lease (5 s) + fence delay (2 s), the defaults, with margin


def qemu_pid(host: Host, vm: str) -> int | None:
    """Pid of the QEMU of *vm* among the host's processes (libvirt need not answer)."""
    for pid in host.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"qemu-system" in cmd[0] and f"guest={vm}".encode() in b",".join(cmd):
            return pid
    return None


def ha_status(agents: Agents, on: Host) -> dict[str, Any]:
    """``vmdr ha status --json`` run inside *on* (etcd lives on the test network)."""
    cfg = agent_config(agents.cluster, on, agents.prefix, agents.guests,
                       **agents.opts)
    p = on.run("env", f"PYTHONPATH={ROOT / 'src'}", sys.executable, "-m", "vmdr.cli.main",
               "ha", "status", "--config", str(cfg), "--json", check=False, timeout=60)
    assert "Traceback" not in p.stderr and p.stdout.startswith("{"), (p.stdout, p.stderr)
    return dict(json.loads(p.stdout))


def libvirt_events(agents: Agents, host: str, state: str) -> list[dict[str, Any]]:
    return [e for e in agents.events() if e["kind"] == "detected" and e["host"] == host
            and (e.get("detail") or {}).get("libvirt") == state]


def test_dead_libvirtd_is_no_host_failure(mh_cluster: Cluster) -> None:
    cluster = mh_cluster
    h1, h2, h3 = cluster.hosts
    g = cluster.new_guest(writer_rate=20)
    g.known.update(cluster.hosts)  # a wrong failover would define it anywhere
    g.start(h2)
    agents = Agents(cluster, {"db": g, "app": g}, extra_vm={"db": ""})
    try:
        agents.start(h1)
        agents.wait_leader("h1")
        agents.start(h2)
        agents.start(h3)
        g.wait_heartbeat(120)
        agents.wait_published(g.name, "h2")
        pid = qemu_pid(h2, g.name)
        assert pid is not None
        seq = g.wait_writer()

        t_kill = time.monotonic()
        h2.kill_libvirtd()
        while time.monotonic() - t_kill < DEAD_S:
            assert qemu_pid(h2, g.name) == pid, "the guest's QEMU died with libvirtd"
            elsewhere = running_on(cluster, g)  # h2's libvirt is down: h1 and h3 only
            assert elsewhere == [], f"{g.name} started on {elsewhere} while it runs on h2"
            assert all(p.poll() is None for p in agents.procs.values()), agents.logs()
            time.sleep(0.2)
        events = agents.events()
        wrong = [e for e in events if e["kind"] in ("fenced", "self-fenced", "started")
                 or (e["kind"] == "detected" and e["host"] == "h2"
                     and not (e.get("detail") or {}).get("libvirt"))]
        assert not wrong, (wrong, agents.logs())
        assert libvirt_events(agents, "h2", "unreachable"), (events, agents.logs())
        assert agents.etcd("get", f"{agents.prefix}members/h2", "--keys-only").strip()
        seq = g.wait_writer(above=seq, timeout=60)  # the guest writes on meanwhile
        st = ha_status(agents, h1)
        assert [(v["vm"], v["host"]) for v in st["vms"]] == [(g.name, "h2")], st
        assert next(h for h in st["hosts"] if h["host"] == "h2")["lease"], st
        print(f"libvirtd of h2 dead {time.monotonic() - t_kill:.1f}s: {g.name} ran on h2 "
              f"only (QEMU pid {pid}), no failover, no fencing")

        h2.restart_libvirtd()
        t_back = time.monotonic()
        assert g.is_running_on(h2)  # libvirtd found its QEMU again
        while not libvirt_events(agents, "h2", "reachable"):
            assert time.monotonic() - t_back < 45, agents.logs()
            time.sleep(0.3)
        print(f"h2's agent saw libvirt again {time.monotonic() - t_back:.1f}s after the "
              "restart")
        assert running_on(cluster, g) == ["h2"] and qemu_pid(h2, g.name) == pid
        assert not [e for e in agents.events() if e["kind"] in ("fenced", "self-fenced",
                                                                "started")]
        seq = g.wait_writer(above=seq, timeout=60)

        # libvirtd dead AND the lease lost: self-fencing cannot use libvirt; the agent
        # kills the QEMU by libvirt's pid file before the leader restarts it elsewhere
        h2.kill_libvirtd()
        time.sleep(1.0)
        t_cut = time.monotonic()
        h2.partition()
        gone_at = moved_at = None
        while moved_at is None:
            assert time.monotonic() - t_cut < 60, ("no failover", agents.logs())
            on_h2 = qemu_pid(h2, g.name) is not None
            others = running_on(cluster, g)
            assert not (on_h2 and others), f"{g.name} runs on h2 and on {others}"
            if not on_h2 and gone_at is None:
                gone_at = time.monotonic()
            if others:
                moved_at = time.monotonic()
            time.sleep(0.1)
        assert gone_at is not None and gone_at <= moved_at
        print(f"libvirtd dead and partitioned: QEMU killed {gone_at - t_cut:.1f}s after the "
              f"cut, {g.name} on {running_on(cluster, g)} {moved_at - t_cut:.1f}s after it")
        h2.heal()
        h2.restart_libvirtd()
        g.wait_writer(above=seq, timeout=60)  # it writes on, elsewhere
        assert len(running_on(cluster, g)) == 1 and not g.is_running_on(h2)
    finally:
        agents.stop()
        if h2.alive() and h2.daemon_pid("libvirtd") is None:
            h2.restart_libvirtd()


def member(agents: Agents, host: str) -> dict[str, Any]:
    raw = agents.etcd("get", f"{agents.prefix}members/{host}", "--print-value-only").strip()
    return dict(json.loads(raw)) if raw.startswith("{") else {}


def test_dead_libvirtd_host_is_no_failover_target(mh_cluster: Cluster) -> None:
    """libvirtd of h2 killed (h2 alive: it renews its lease and says so in its member
    key), then h1 killed with -9: h1's HA guest restarts on h3 — never on h2, which it
    prefers (``hosts = ["h2"]``, should) and which would otherwise be chosen, and never
    twice."""
    cluster = mh_cluster
    h1, h2, h3 = cluster.hosts
    g = cluster.new_guest(writer_rate=0)
    g.known.update(cluster.hosts)
    g.start(h1)
    agents = Agents(cluster, {"db": g, "app": g},
                    extra_vm={"db": 'hosts = ["h2"]\nhosts_rule = "should"'})
    try:
        agents.start(h3)
        agents.wait_leader("h3")
        agents.start(h1)
        agents.start(h2)
        agents.wait_published(g.name, "h1")
        agents.wait_member("h2")
        st = ha_status(agents, h3)
        assert [v["would_go_to"] for v in st["vms"]] == ["h2"], st  # its preferred host

        h2.kill_libvirtd()
        t0 = time.monotonic()
        while member(agents, "h2").get("libvirt_ok") is not False:
            assert time.monotonic() - t0 < 30, agents.logs()
            time.sleep(0.3)
        print(f"h2's member key says libvirt down {time.monotonic() - t0:.1f}s after the "
              "kill of its libvirtd")
        st = ha_status(agents, h3)
        h2_row = next(h for h in st["hosts"] if h["host"] == "h2")
        assert h2_row["lease"] and h2_row["libvirt"]["ok"] is False, st
        assert [v["would_go_to"] for v in st["vms"]] == ["h3"], st

        t_kill = time.monotonic()
        h1.kill()
        while True:
            assert qemu_pid(h2, g.name) is None, f"{g.name} started on h2"
            where = running_on(cluster, g)
            assert len(where) <= 1, f"{g.name} runs on {where}"
            if where:
                break
            assert time.monotonic() - t_kill < 90, ("no failover", agents.logs())
            time.sleep(0.1)
        assert where == ["h3"], (where, agents.events())
        print(f"h1 killed: {g.name} running on h3 {time.monotonic() - t_kill:.1f}s later")
        time.sleep(2.0)  # a second start would show by now
        assert running_on(cluster, g) == ["h3"] and qemu_pid(h2, g.name) is None
        events = agents.events()
        to_h2 = [e for e in events if e["vm"] == g.name and e["host"] == "h2"
                 and e["kind"] in ("placed", "started")]
        assert not to_h2, to_h2
        started = [e for e in events if e["kind"] == "started" and e["vm"] == g.name]
        assert [e["host"] for e in started] == ["h3"], events
        assert not [e for e in events if e["kind"] in ("fenced", "detected")
                    and e["host"] == "h2" and not (e.get("detail") or {}).get("libvirt")]
    finally:
        agents.stop()
        if h2.alive() and h2.daemon_pid("libvirtd") is None:
            h2.restart_libvirtd()
