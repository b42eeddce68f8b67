"""The agent fleet on the multi-host harness: three libvirt hosts in network namespaces,
a three-member etcd on the test network, PostgreSQL over a unix socket, a real guest.

Each host runs `python -m vmdr.agent` inside its namespaces. h1 starts first and leads;
the guest runs on h2, whose agent backs it up every PERIOD seconds as the leader
schedules. Killing h1 (kill -9 of every process of the host, its agent included) hands
the leader key to another host within the lease TTL, and the guest's scheduled backups
go on with no occurrence missed and none doubled.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from vmdr.agent.history import History

from .agent_services import postgres  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.etcd, pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]
PERIOD = 10
TTL = 3

try:
    from tests.multihost.fixtures import mh_cluster, mh_cluster_session  # noqa: F401
except ImportError:  # the harness is not in this tree
    pytest.skip("needs tests/multihost", allow_module_level=True)


def test_fleet_leader_host_killed(mh_cluster, postgres: tuple[str, str]  # noqa: F811
                                  ) -> None:
    cluster = mh_cluster
    h1, h2, h3 = cluster.hosts
    shared = Path(cluster.shared)
    pw = shared / "agent-pw"
    pw.write_text("fleet test passphrase\n")
    pw.chmod(0o600)
    repo = shared / "agent-repo"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), VMDR_INSECURE_TEST_KDF="1")
    subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--repo", str(repo),
                    "--password-file", str(pw), "repo", "init"], env=env, check=True,
                   capture_output=True)
    guest = cluster.new_guest()
    guest.start(h2)
    guest.wait_heartbeat(120)
    prefix = f"/vmdr-mh-{os.getpid()}-{int(time.time())}/"
    procs = {}
    for h in (h1, h2, h3):
        cfg = shared / f"agent-{h.name}.toml"
        cfg.write_text(f"""
connect = "qemu:///system"
[repositories.shared]
url = "{repo}"
password_file = "{pw}"
[agent]
host = "{h.name}"
state = "{shared}/agent-{h.name}.db"
database = "{postgres[1]}"
etcd = [{", ".join(f'"{e}"' for e in cluster.etcd.endpoints)}]
etcd_prefix = "{prefix}"
lease_ttl = "{TTL}s"
[policies.fast]
vms = ["{guest.name}"]
schedule = "*:*:0/{PERIOD}"
repository = "shared"
""")
        log = open(shared / f"agent-{h.name}.log", "wb")  # noqa: SIM115
        procs[h.name] = h.popen(sys.executable, "-m", "vmdr.agent", "--config", str(cfg),
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # h1 first: it takes the leader key

    def leader() -> str:
        p = cluster.etcd.ctl("get", f"{prefix}leader", "--print-value-only", host=h3,
                             check=False)
        return str(p.stdout).strip()

    def logs() -> str:
        return "\n".join((shared / f"agent-{h.name}.log").read_text()[-3000:]
                         for h in (h1, h2, h3))

    try:
        deadline = time.monotonic() + 30
        while leader() != "h1" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert leader() == "h1", logs()
        time.sleep(2 * PERIOD + 5)
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
        time.sleep(2 * PERIOD + 5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    hist = History.open("/nonexistent/unused.db", postgres[1])
    jobs = [j for j in hist.jobs(limit=1000, vm=guest.name) if j.requested_by == "schedule"]
    dues = sorted(j.scheduled_for or 0 for j in jobs)
    assert dues, logs()
    assert max(Counter(dues).values()) == 1, f"doubled: {dues}"
    assert {round(b - a) for a, b in itertools.pairwise(dues)} == {PERIOD}, f"missed: {dues}"
    assert dues[0] < t_kill - PERIOD and dues[-1] > t_kill + PERIOD
    ok = [j for j in jobs if j.state == "ok"]
    assert len(ok) >= len(dues) - 1, [(j.state, j.error) for j in jobs]
    assert all(j.host == "h2" for j in jobs)
    print(f"h1 killed; {new_leader} leads after {handover:.1f}s; {len(ok)} backups")
