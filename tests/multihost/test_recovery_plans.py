"""Recovery plans on two sites: h1 is the source site, h2 the DR site (tests/multihost).

vmdr runs inside h1 (inside h2 once h1 is gone) and reaches the other site over ssh on
the test network inside the namespaces; nothing contacts a test address from the root
namespace. One guest writing sequence-numbered records goes through the whole life of a
hot site, in order, on one module-scoped cluster:

``recovery check`` (a good plan, a broken one) → a refused planned failover (stale
replica) → a refused concurrent run (plan lock) → test failover (the source keeps
writing; nothing left behind) → planned failover (the DR copy holds exactly the source's
last record) → failback (nothing written at the DR site lost; re-protected) → the source
site dies → unplanned failover (a consistent prefix, data loss reported).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.records import check_records
from tests.multihost.cluster import Cluster
from tests.multihost.fixtures import skip_unless_multihost
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host

pytestmark = [pytest.mark.multihost, pytest.mark.vm]
ROOT = "/var/lib/libvirt/images/vmdr-replicas"  # inside h2


class Sites:
    def __init__(self, c: Cluster, g: Guest, work: Path) -> None:
        self.c, self.g, self.work = c, g, work
        self.h1, self.h2 = c.hosts
        self.reports = work / "reports"
        self.locks = work / "locks"
        self.dr_uri = c.ssh_uri(self.h2) + "&known_hosts=/dev/null"
        self.config = work / "vmdr.toml"
        self.config.write_text(self.toml(self.dr_uri))

    def toml(self, dr: str, vm: str | None = None) -> str:
        g = self.g.name
        return f"""
[vm.{g}]
replica_to = "{dr}"
replica_dir = "{ROOT}"
replica_rpo = "1h"

[recovery]
reports = "{self.reports}"

[recovery_plans.app]
vms = ["{vm or g}"]
ready = "agent"
ready_timeout = "150s"
shutdown_timeout = "90s"
[recovery_plans.app.groups.1]
post = ["guest:test -e /proc/version", "host:test -n \\"$VMDR_RUN\\""]

[recovery_plans.stale]
vms = ["{g}"]
rpo = "1s"

[recovery_plans.fragile]
vms = ["{g}"]
ready = "agent"
ready_timeout = "150s"
shutdown_timeout = "90s"
[recovery_plans.fragile.groups.1]
post = ["host:echo the application did not come up >&2; exit 3"]
"""

    def vmdr(self, *args: str, host: Host | None = None, code: int = 0,
             config: Path | None = None, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        h = host or self.h1
        p = h.run("env", f"VMDR_LOCK_DIR={self.locks}", sys.executable, "-m",
                  "vmdr.cli.main", "--config", str(config or self.config), *args,
                  check=False, timeout=timeout)
        assert p.returncode == code, p.stdout + p.stderr
        assert "Traceback" not in p.stderr
        return p

    def js(self, *args: str, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.vmdr(*args, "--json", **kw).stdout)
        return out

    @property
    def vmdir(self) -> Path:
        return self.h2.dir / "lib-libvirt" / "images" / "vmdr-replicas" / self.g.name

    def dr_console(self) -> str:
        try:
            return (self.vmdir / f"{self.g.name}-replica-console.log").read_text(
                errors="replace")
        except FileNotFoundError:
            return ""


def _seqs(text: str, what: str = "seq") -> list[int]:
    import re

    rx = r"VMDR-WRITER start seq=(\d+)" if what == "start" else r"VMDR-WRITER seq=(\d+)"
    return [int(n) for n in re.findall(rx, text)]


def _wait(what: str, fn: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    skip_unless_multihost()
    work = tmp_path_factory.mktemp("recovery")
    work.chmod(0o755)
    with Cluster(hosts=2, etcd=False, sshd=True) as c:
        g = c.new_guest(local_to=c.hosts[0], writer_rate=20)
        g.start(c.hosts[0])
        g.wait_heartbeat(90)
        g.wait_writer(timeout=60)
        s = Sites(c, g, work)
        seed = s.js("replicate", g.name)["results"][0]
        assert seed["mode"] == "seed", seed
        yield s


def test_check_catches_a_broken_plan_and_refusals_leave_the_source_running(
        sites: Sites) -> None:
    s, g = sites, sites.g
    ok = s.js("recovery", "check", "app")["plans"][0]
    assert ok["ok"] and not [f for f in ok["findings"] if f["severity"] == "error"], ok
    assert ok["memory_needed"]
    bad = s.vmdr("recovery", "check", "stale", "--json", code=42)
    found = json.loads(bad.stdout)["plans"][0]["findings"]
    assert any(f["check"] == "rpo" and f["vm"] == g.name for f in found), found
    assert "vmdr: error:" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    unknown = s.work / "unknown.toml"
    unknown.write_text(s.toml(s.dr_uri, vm="no-such-vm"))
    p = s.vmdr("recovery", "check", config=unknown, code=2)
    assert "recovery_plans.app.vms: unknown VM 'no-such-vm'" in p.stderr, p.stderr

    before = g.writer_seq() or 0
    p = s.vmdr("failover", "stale", "--planned", code=40)
    assert "older than its RPO target" in p.stderr
    import os

    from vmdr.jobs.vmlock import VMLock
    os.environ["VMDR_LOCK_DIR"] = str(s.locks)
    try:
        with VMLock("recovery-plan", "app"):
            p = s.vmdr("failover", "app", "--planned", code=13)
            assert "another failover or failback" in p.stderr
    finally:
        del os.environ["VMDR_LOCK_DIR"]
    assert g.is_running_on(s.h1)
    g.wait_writer(above=before, timeout=30)  # untouched: still writing


def test_test_failover_leaves_nothing_and_the_source_keeps_writing(sites: Sites) -> None:
    s, g = sites, sites.g
    s.js("replicate", g.name)
    before = g.wait_writer(timeout=30)
    rep = s.js("failover", "app", "--test")
    assert rep["outcome"] == "passed", rep
    vm = rep["vms"][0]
    assert vm["outcome"] == "ready" and vm["ready"] == "agent" and vm["rto_s"] > 0
    assert vm["screenshot"] and (s.reports / vm["screenshot"]).stat().st_size > 0
    assert any(st["name"].startswith("clean up") and st["detail"] == "nothing left"
               for st in rep["steps"])
    assert Path(rep["report_html"]).read_text().count(g.name) >= 1
    # nothing left at the DR site: no test domain, network or overlay
    assert not [d for d in s.h2.virsh("list", "--all", "--name").stdout.split()
                if d.startswith("vmdrt-")]
    assert "vmdrt" not in s.h2.virsh("net-list", "--all", "--name").stdout
    assert not list(s.vmdir.glob("test-*"))
    # production kept writing throughout, and its replica still syncs
    assert g.is_running_on(s.h1)
    g.wait_writer(above=before + 10, timeout=30)
    inc = s.js("replicate", g.name)["results"][0]
    assert inc["mode"] == "incremental"
    listed = s.js("failover", "report")["runs"]
    assert [r["kind"] for r in listed if r["outcome"] == "passed"] == ["test"]


def test_a_failed_planned_failover_puts_the_source_back(sites: Sites) -> None:
    s, g = sites, sites.g
    p = s.vmdr("failover", "fragile", "--planned", "--json", code=41)
    rep = json.loads(p.stdout)
    assert rep["outcome"] == "failed" and "the sources were left running" in rep["error"]
    assert "the application did not come up" in rep["error"]
    assert [st["name"] for st in rep["steps"]][-1] == "roll back"
    assert rep["vms"][0]["outcome"] == "rolled-back"
    assert g.is_running_on(s.h1)  # started again, from its own untouched disks
    assert s.h2.virsh("domstate", f"{g.name}-replica").stdout.strip() == "shut off"
    assert not (s.vmdir / "failover.json").exists()
    xml = s.h2.virsh("dumpxml", "--inactive", f"{g.name}-replica").stdout
    assert "/failover/" not in xml  # the standby has its own disks back
    g.wait_writer(above=g.writer_seq() or 0, timeout=90)


def test_planned_failover_then_failback_lose_nothing(sites: Sites) -> None:
    s, g = sites, sites.g
    rep = s.js("failover", "app", "--planned")
    assert rep["outcome"] == "passed", rep
    assert rep["vms"][0]["rpo_s"] == 0.0 and rep["rto_s"] > 0
    assert not g.is_running_on(s.h1)
    assert s.h2.virsh("domstate", f"{g.name}-replica").stdout.strip() == "running"
    # the source's disk, shut down cleanly, and the DR copy's point hold the same last record
    src = check_records(str(g.data_disk), "qcow2")
    assert src.consistent, src.problems
    dr = check_records(str(s.vmdir / f"{g.name}-replica-vdb.qcow2"), "qcow2", force_share=True)
    assert dr.consistent and dr.last_seq == src.last_seq, (dr, src)
    start = _wait("the writer at the DR site", lambda: _seqs(s.dr_console(), "start"))
    assert start[-1] == src.last_seq + 1  # the DR copy resumed right after the last record
    # the DR site writes on; then fail back
    _wait("DR writes", lambda: (x := _seqs(s.dr_console())) and x[-1] > start[-1] + 20)
    back = s.js("failback", "app")
    assert back["outcome"] == "passed", back
    dr_last = _seqs(s.dr_console())[-1]
    steps = {st["name"]: st for st in back["steps"] if st["vm"] == g.name}
    assert "changes made at the DR site" in steps["reverse replication"]["detail"]
    assert "replica cycle" in steps["re-protect"]["detail"]
    assert g.is_running_on(s.h1)
    assert s.h2.virsh("domstate", f"{g.name}-replica").stdout.strip() == "shut off"
    resumed = _wait("the writer back at the source",
                    lambda: [n for n in _seqs(g.console_text(), "start") if n > src.last_seq])
    assert resumed[-1] > dr_last  # nothing written at the DR site was lost
    st = s.js("replicate", "status")["replicas"][0]
    assert st["sla"] == "meeting-sla" and not st["error"], st


def test_unplanned_failover_after_losing_the_source_site(sites: Sites) -> None:
    s, g = sites, sites.g
    before = g.wait_writer(timeout=30)  # written before the last cycle starts
    inc = s.js("replicate", g.name)["results"][0]
    assert inc["mode"] == "incremental"
    # the standby's console log is rewritten on each start; start from an empty one
    (s.vmdir / f"{g.name}-replica-console.log").unlink(missing_ok=True)
    # the source writes on for 3 s after the cycle (the report's start time has whole
    # seconds, so its RPO can read up to 1 s short: at least 2 s stay)
    time.sleep(3)
    s.h1.kill()  # the source site is gone; vmdr now runs at the DR site
    s.config.write_text(s.toml("qemu:///system"))
    src = s.c.ssh_uri(s.h1) + "&known_hosts=/dev/null"
    rep = s.js("failover", "app", "--connect", src, host=s.h2)
    assert rep["outcome"] == "passed", rep
    vm = rep["vms"][0]
    assert vm["point"] == inc["point"] and vm["rpo_s"] >= 2 and "lost" in vm["records_note"]
    start = _wait("the writer at the DR site",
                  lambda: _seqs(s.dr_console(), "start"))
    assert start[-1] > before  # it resumed after every record written before the cycle
    s.h2.virsh("destroy", f"{g.name}-replica")
    raw = s.work / "unplanned-vdb.raw"  # the overlay's backing path exists inside h2 only
    s.h2.run("qemu-img", "convert", "-O", "raw", f"{ROOT}/{g.name}/failover/vdb.qcow2", str(raw))
    rc = check_records(str(raw), "raw")
    assert rc.consistent, rc.problems  # a consistent prefix of the stream
    assert rc.last_seq >= start[-1] - 1 >= before
