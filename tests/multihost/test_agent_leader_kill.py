"""The agent fleet on the multi-host harness: three libvirt hosts in network namespaces,
a three-member etcd on the test network, PostgreSQL over a unix socket, a real guest.

Each host runs `python -m vmdr.agent` inside its namespaces. h1 starts first and leads;
the guest runs on h2, whose agent backs it up every PERIOD seconds as the leader
schedules. Killing h1 (kill -9 of every process of the host, its agent included) hands
the leader key to another host within the lease TTL, and the guest's scheduled backups
go on with no occurrence missed and none doubled.

In the default run (about 40 s on the session's cluster): it waits for events (the
leader key, the jobs in PostgreSQL), never for fixed periods.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.agent_services import postgres  # noqa: F401
from tests.multihost.cluster import Cluster
from tests.multihost.hosts import Host
from vmdr.agent.history import History, Job

pytestmark = [pytest.mark.multihost, pytest.mark.vm, pytest.mark.etcd, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]
PERIOD = 6  # a backup of the guest takes 1-3 s here
TTL = 3


def wait_until(what: str, cond: Callable[[], object], timeout: float,
               logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.25)


def test_fleet_leader_host_killed(mh_cluster: Cluster, postgres: tuple[str, str]  # noqa: F811
                                  ) -> None:
    cluster = mh_cluster
    etcd = cluster.etcd
    assert etcd is not None
    h1, h2, h3 = cluster.hosts
    shared = Path(cluster.shared)
    pw = shared / "agent-pw"
    pw.write_text("fleet test passphrase\n")
    pw.chmod(0o600)
    repo = shared / f"agent-repo-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), VMDR_INSECURE_TEST_KDF="1")
    subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--repo", str(repo),
                    "--password-file", str(pw), "repo", "init"], env=env, check=True,
                   capture_output=True)
    guest = cluster.new_guest()
    guest.start(h2)  # its disks are backed up whether or not it has finished booting
    prefix = f"/vmdr-mh-{os.getpid()}-{time.monotonic_ns()}/"
    hist = History.open("/nonexistent/unused.db", postgres[1])

    def scheduled() -> list[Job]:
        return [j for j in hist.jobs(limit=1000, vm=guest.name) if j.requested_by == "schedule"]

    def leader() -> str:
        p = etcd.ctl("get", f"{prefix}leader", "--print-value-only", host=h3, check=False)
        return str(p.stdout).strip()

    def logs() -> str:
        return "\n".join(f"--- {h.name}\n" + (shared / f"agent-{h.name}.log").read_text()[-3000:]
                         for h in (h1, h2, h3) if (shared / f"agent-{h.name}.log").exists())

    procs = {}

    def start_agent(h: Host) -> None:
        name = h.name
        cfg = shared / f"agent-{name}.toml"
        cfg.write_text(f"""
connect = "qemu:///system"
[repositories.shared]
url = "{repo}"
password_file = "{pw}"
[agent]
host = "{name}"
state = "{shared}/agent-{name}.db"
database = "{postgres[1]}"
etcd = [{", ".join(f'"{e}"' for e in etcd.endpoints)}]
etcd_prefix = "{prefix}"
lease_ttl = "{TTL}s"
[policies.fast]
vms = ["{guest.name}"]
schedule = "*:*:0/{PERIOD}"
repository = "shared"
""")
        log = open(shared / f"agent-{name}.log", "wb")  # noqa: SIM115
        procs[name] = h.popen(sys.executable, "-m", "vmdr.agent", "--config", str(cfg),
                              env=env, stdout=log, stderr=subprocess.STDOUT)

    try:
        start_agent(h1)  # h1 first: it takes the leader key
        wait_until("h1 to lead", lambda: leader() == "h1", 30, logs)
        start_agent(h2)
        start_agent(h3)
        # two scheduled backups under h1, the second finished (the first is a full backup
        # of a guest still booting under TCG: on a loaded machine it has taken over 30 s)
        wait_until("two backups under h1", lambda: len(
            [j for j in scheduled() if j.state == "ok"]) >= 2, 6 * PERIOD + 60, logs)
        t_kill = time.time()
        h1.kill()
        handover, new_leader = None, ""
        while time.time() - t_kill < TTL + 10:
            now = leader()
            if now and now != "h1":
                handover, new_leader = time.time() - t_kill, now
                break
            time.sleep(0.2)
        assert handover is not None, logs()
        assert handover <= TTL + 2.0, f"handover {handover:.1f}s"
        # two more occurrences after the kill, all finished
        wait_until("two backups under the new leader", lambda: len(
            [j for j in scheduled() if (j.scheduled_for or 0) > t_kill + PERIOD
             and j.state in ("ok", "failed", "interrupted")]) >= 2, 6 * PERIOD, logs)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    jobs = scheduled()
    dues = sorted(j.scheduled_for or 0 for j in jobs)
    assert max(Counter(dues).values()) == 1, f"doubled: {dues}"
    assert {round(b - a) for a, b in itertools.pairwise(dues)} == {PERIOD}, f"missed: {dues}"
    assert dues[0] < t_kill - PERIOD and dues[-1] > t_kill + PERIOD
    ok = [j for j in jobs if j.state == "ok"]
    # the last one may have been stopped with the agents
    assert len(ok) >= len(dues) - 1, [(j.state, j.error) for j in jobs]
    assert all(j.host == "h2" for j in jobs)
    print(f"h1 killed; {new_leader} leads after {handover:.1f}s; {len(ok)} of {len(dues)} "
          "scheduled backups ok")
