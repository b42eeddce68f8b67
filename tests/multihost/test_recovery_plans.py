"""Recovery plans on two sites: h1 is the source site, h2 the DR site (tests/multihost).

vmdr runs inside h1 (inside h2 once h1 is gone) and reaches the other site over ssh on
the test network inside the namespaces; nothing contacts a test address from the root
namespace. One guest writing sequence-numbered records goes through the whole life of a
hot site, in order, on one module-scoped cluster:

``recovery check`` and ``plan check`` (a good plan, broken ones) → a refused planned
failover (stale replica; a DR host without the memory) → a refused concurrent run (plan
lock) → test failover with a replica cycle *during* it (the source keeps writing, the cycle
adds a point beside the pinned one, the test copy's view does not change; nothing left
behind) → a second guest with a NIC: test failover with ``tcp:`` readiness and re-IP →
planned failover (the DR copy holds exactly the source's last record) → failback (nothing
written at the DR site lost; re-protected) → the source site dies → unplanned failover
(a consistent prefix, data loss reported).

The NIC guest's networks exist only inside the hosts' namespaces: ``lan`` on h1,
``dr-lan`` and ``test-lan`` (10.99.8.1/24, the DR host's leg for the ``tcp:`` check) on
h2; the route inside h2 is asserted before the failover sends anything.
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

from tests.guest.domxml import make_domain_xml
from tests.guest.records import check_records
from tests.multihost.cluster import Cluster
from tests.multihost.fixtures import skip_unless_multihost
from tests.multihost.guests import Guest
from tests.multihost.hosts import Host
from vmdr.hypervisor.xml import dac_identity

pytestmark = [pytest.mark.multihost, pytest.mark.vm]
ROOT = "/var/lib/libvirt/images/vmdr-replicas"  # inside h2


TEST_LAN = "vmdrtlan0"  # the test network's bridge inside h2
SRC_ADDR, DR_ADDR, TEST_ADDR = "10.99.0.5", "10.99.4.5", "10.99.8.5"


class Sites:
    def __init__(self, c: Cluster, g: Guest, work: Path, g2: Guest) -> None:
        self.c, self.g, self.work, self.g2 = c, g, work, g2
        self.h1, self.h2 = c.hosts
        self.reports = work / "reports"
        self.locks = work / "locks"
        self.dr_uri = c.ssh_uri(self.h2) + "&known_hosts=/dev/null"
        self.config = work / "vmdr.toml"
        self.config.write_text(self.toml(self.dr_uri))

    def toml(self, dr: str, vm: str | None = None, inventory: bool = False) -> str:
        """The config; ``inventory``: with the sites as hosts (what `plan check` needs)."""
        g = self.g.name
        placed = 'host = "src"\n' if inventory else ""
        sites = "" if not inventory else f"""
[locations.site1]
kind = "building"
[locations.site2]
kind = "building"
[hosts.src]
uri = "qemu:///system"
location = "site1"
[hosts.dr]
uri = "{dr}"
location = "site2"
"""
        cycle = (f"host:{sys.executable} -m vmdr.cli.main --config {self.config} replicate "
                 f"{g} --points 1 --json > {self.work}/during.json")
        return sites + f"""
[vm.{g}]
{placed}replica_to = "{dr}"
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

[vm.{self.g2.name}]
{placed}replica_to = "{dr}"
replica_dir = "{ROOT}"
replica_network_map = {{ lan = "dr-lan" }}

[recovery_plans.sync]
vms = ["{g}"]
ready = "agent"
ready_timeout = "150s"
[recovery_plans.sync.groups.1]
post = [
  # the test copy stops its own writer and fingerprints its records area
  "guest:echo 0 > /run/vmdr-rate; killall vmdr-writer; sleep 1; md5sum /dev/vdb2 > /run/fp",
  # who may connect to the frozen point's exports (mode and group of each socket)
  "host:stat -c '%a %g' {self.vmdir}/test-*/*.sock > {self.work}/socks.txt",
  # a replica cycle of the same VM now, keeping 1 point: it writes the standby's disks
  "{cycle}",
  # the test copy reads exactly what it read before the cycle
  "guest:echo 3 > /proc/sys/vm/drop_caches; md5sum /dev/vdb2 | cmp -s - /run/fp",
]

[recovery_plans.net]
vms = ["{self.g2.name}"]
ready = "tcp:8080"
ready_timeout = "150s"
test_network_map = {{ lan = "test-lan" }}
reip_rules = [{{ from = "10.99.0.0/24", to = "10.99.4.0/24", test_to = "10.99.8.0/24" }}]
[recovery_plans.net.groups.1]
post = ["guest:ip -o -4 addr show eth0 | grep -q 'inet {TEST_ADDR}/24'"]

[recovery_plans.badnet]
vms = ["{self.g2.name}"]
network_map = {{ lan = "no-such-net" }}

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
        p = h.run("env", f"VMDR_LOCK_DIR={self.locks}", f"VMDR_CACHE_DIR={self.work}/cache",
                  sys.executable, "-m",
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
        h1, h2 = c.hosts
        _networks(h1, h2)
        g = c.new_guest(local_to=h1, writer_rate=20)
        g2 = c.new_guest(local_to=h1, writer_rate=2)
        g2.xml = make_domain_xml(g2.name, g2.boot_disk, g2.data_disk,
                                 console_log=g2.console_log, writer_rate=2, memory_mib=128,
                                 network="lan")
        g.start(h1)
        g2.start(h1)
        g.wait_heartbeat(90)
        g.wait_writer(timeout=60)
        g2.wait_heartbeat(90)
        _give_address(h1, g2)
        s = Sites(c, g, work, g2)
        seed = s.js("replicate", g.name)["results"][0]
        assert seed["mode"] == "seed", seed
        assert s.js("replicate", g2.name)["results"][0]["mode"] == "seed"
        yield s


def _networks(h1: Host, h2: Host) -> None:
    """Isolated networks inside the hosts' namespaces (no forward, no DNS/DHCP)."""
    def net(name: str, bridge: str, ip: str = "") -> str:
        addr = f"<ip address='{ip}' prefix='24'/>" if ip else ""
        return (f"<network><name>{name}</name><bridge name='{bridge}'/><dns enable='no'/>"
                f"{addr}</network>")

    for h in (h1, h2):  # libvirt keeps a network's MAC list there, even without dnsmasq
        (h.dir / "lib-libvirt" / "dnsmasq").mkdir(exist_ok=True)
    h1.conn().networkCreateXML(net("lan", "vmdrlan0"))
    h2.conn().networkCreateXML(net("dr-lan", "vmdrdrlan0"))
    h2.conn().networkCreateXML(net("test-lan", TEST_LAN, "10.99.8.1"))


RC_LOCAL = f"""#!/bin/sh
ip link set eth0 up
ip addr add {SRC_ADDR}/24 dev eth0
mkdir -p /data/www && echo vmdr > /data/www/index.html
httpd -p 8080 -h /data/www
"""


def _agent_exec(host: Host, vm: str, script: str, timeout: float = 90) -> str:
    """``sh -c script`` in ``vm`` through its guest agent (libvirt's unix socket)."""
    from vmdr.errors import VmdrError
    from vmdr.hypervisor import connect

    hv = connect(host.uri)
    try:
        dom = hv.lookup(vm)
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = dom.guest_exec(["/bin/sh", "-c", script], timeout=60)
                assert r.ok, (r.exitcode, r.stderr)
                return r.stdout
            except VmdrError:
                assert time.monotonic() < deadline, "the guest agent does not answer"
                time.sleep(1)
    finally:
        hv.close()


def _give_address(h1: Host, g2: Guest) -> None:
    """The guest's network configuration, on its data disk (run at every boot, also by
    its replicas), and applied now."""
    import shlex

    _agent_exec(h1, g2.name, "mkdir -p /data/vmdr && printf '%s' "
                f"{shlex.quote(RC_LOCAL)} > /data/vmdr/rc.local && chmod 0755 "
                "/data/vmdr/rc.local && sync && /data/vmdr/rc.local")


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

    # `vmdr plan check` names the broken recovery plans, one line each (exit 1); offline it
    # keeps to the config (the missing network is only seen at the DR host)
    inv = s.work / "inventory.toml"
    inv.write_text(s.toml(s.dr_uri, inventory=True))
    p = s.vmdr("plan", "check", config=inv, code=1)
    lines = p.stdout.splitlines()
    assert any(ln.startswith(f"recovery plan badnet: {s.g2.name}: ") and "no-such-net" in ln
               for ln in lines), lines
    assert any(ln.startswith("recovery plan stale: ") and "RPO target" in ln
               for ln in lines), lines
    assert not [ln for ln in lines if ln.startswith(("recovery plan app:",
                                                     "recovery plan net:"))], lines
    off = s.vmdr("plan", "check", "--offline", config=inv, code=1).stdout
    assert "recovery plan badnet" not in off and "recovery plan stale" not in off, off

    before = g.writer_seq() or 0
    p = s.vmdr("failover", "stale", "--planned", code=40)
    assert "older than its RPO target" in p.stderr
    # a DR host without the memory: the standby now needs more than h2 has free
    standby = f"{g.name}-replica"
    saved = s.work / "standby.xml"
    saved.write_text(s.h2.virsh("dumpxml", "--inactive", standby).stdout)
    try:
        s.h2.virsh("setmaxmem", standby, "256G", "--config")
        s.h2.virsh("setmem", standby, "256G", "--config")
        p = s.vmdr("failover", "app", "--planned", code=43)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.startswith("vmdr: error: recovery plan app: the VMs need 262144 MiB "
                                   "of memory at "), p.stderr
        assert "nothing was stopped or started" in p.stderr
        s.vmdr("failover", "app", "--test", code=43)
    finally:
        s.h2.virsh("define", str(saved))
    assert s.h2.virsh("domstate", standby).stdout.strip() == "shut off"
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


def _leftovers(s: Sites, vm: str) -> list[str]:
    """Test copies, bubbles, overlays, exports and pins of ``vm`` left at the DR site."""
    left = [d for d in s.h2.virsh("list", "--all", "--name").stdout.split()
            if d.startswith("vmdrt-")]
    left += [n for n in s.h2.virsh("net-list", "--all", "--name").stdout.split()
             if n.startswith("vmdrt")]
    vmdir = s.vmdir.parent / vm
    left += [str(p) for p in vmdir.glob("test-*")]
    left += subprocess.run(["pgrep", "-af", f"qemu-nbd.*{ROOT}/{vm}/test-"],
                           capture_output=True, text=True).stdout.splitlines()
    return left


def test_test_failover_leaves_nothing_and_replication_goes_on_during_it(
        sites: Sites) -> None:
    s, g = sites, sites.g
    s.js("replicate", g.name)
    before = g.wait_writer(timeout=30)
    rep = s.js("failover", "sync", "--test")
    assert rep["outcome"] == "passed", rep
    vm = rep["vms"][0]
    assert vm["outcome"] == "ready" and vm["ready"] == "agent" and vm["rto_s"] > 0
    assert vm["screenshot"] and (s.reports / vm["screenshot"]).stat().st_size > 0
    assert any(st["name"].startswith("clean up") and st["detail"] == "nothing left"
               for st in rep["steps"])
    assert Path(rep["report_html"]).read_text().count(g.name) >= 1
    # the cycle ran during the test and succeeded: it wrote the standby's disks, added a
    # point and, keeping 1, rotated every other point but the one under test (pinned)
    during = json.loads((s.work / "during.json").read_text())["results"][0]
    tested = vm["point"]
    assert during["mode"] == "incremental" and during["bytes_moved"] > 0, during
    assert during["points"] == [tested, during["point"]], (tested, during)
    assert tested not in during["rotated"]
    # ... and the test copy's records area read the same before and after it (post-script
    # 3 compared it in the guest, else the run would have failed)
    posts = [st for st in rep["steps"] if st["name"] == "group 1 post-script"]
    assert len(posts) == 4 and all(st["status"] == "ok" for st in posts), posts
    # only QEMU reached the exports: 0660 with its group, or 0600 when it runs as root
    qemu = dac_identity(s.h2.virsh("capabilities").stdout)
    socks = (s.work / "socks.txt").read_text().splitlines()
    assert socks, "no export socket seen during the test"
    want = ("600", None) if qemu is None or qemu[0] == 0 else ("660", str(qemu[1]))
    for line in socks:
        mode, gid = line.split()
        assert mode == want[0] and want[1] in (None, gid), (line, qemu)
    # nothing left at the DR site: no test domain, network, overlay, export or pin
    assert _leftovers(s, g.name) == []
    # production kept writing throughout, without a gap: the point the cycle took during
    # the test holds a contiguous run of records past the ones written before the test
    assert g.is_running_on(s.h1)
    g.wait_writer(above=before + 10, timeout=30)
    dr = check_records(str(s.vmdir / f"{g.name}-replica-vdb.qcow2"), "qcow2", force_share=True)
    assert dr.consistent and dr.last_seq > before, (dr, before)
    after = s.js("replicate", g.name, "--points", "1")["results"][0]  # the pin is gone
    assert after["mode"] == "incremental" and tested in after["rotated"], after
    listed = s.js("failover", "report", "--plan", "sync")["runs"]
    assert [r["kind"] for r in listed if r["outcome"] == "passed"] == ["test"]


def test_tcp_readiness_and_re_ip_on_a_guest_with_a_nic(sites: Sites) -> None:
    s, g2 = sites, sites.g2
    # the network safety rule: the DR host reaches the test address over test-lan only
    route = s.h2.run("ip", "route", "get", TEST_ADDR).stdout
    assert f"dev {TEST_LAN}" in route, route
    assert s.h2.run("ip", "route", "get", SRC_ADDR, check=False).returncode != 0 or \
        TEST_LAN not in s.h2.run("ip", "route", "get", SRC_ADDR, check=False).stdout
    rep = s.js("failover", "net", "--test")
    assert rep["outcome"] == "passed", rep
    vm = rep["vms"][0]
    assert vm["ready"] == "tcp:8080" and vm["addresses"] == [TEST_ADDR], vm
    names = [st["name"] for st in rep["steps"] if st["vm"] == g2.name]
    assert names.index("re-IP") < names.index("wait until ready (tcp:8080)"), names
    reip = next(st for st in rep["steps"] if st["name"] == "re-IP")
    assert reip["detail"] == TEST_ADDR
    # the DR copy had the mapped address (post-script read it in the guest: `ip addr`)
    post = next(st for st in rep["steps"] if st["name"] == "group 1 post-script")
    assert post["status"] == "ok"
    # the source keeps its own address
    src = _agent_exec(s.h1, g2.name, "ip -o -4 addr show eth0")
    assert f"inet {SRC_ADDR}/24" in src and TEST_ADDR not in src, src
    assert _leftovers(s, g2.name) == []
    assert "vmdrt" not in s.h2.virsh("net-list", "--all", "--name").stdout


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
    s.h1.virsh("autostart", g.name)  # a rebooted h1 would start it beside its DR copy
    rep = s.js("failover", "app", "--planned")
    assert rep["outcome"] == "passed", rep
    assert rep["vms"][0]["rpo_s"] == 0.0 and rep["rto_s"] > 0
    assert not g.is_running_on(s.h1)
    assert "Autostart:      disable" in s.h1.virsh("dominfo", g.name).stdout
    assert any(st["name"] == "turn the source's autostart off" for st in rep["steps"])
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
    assert "Autostart:      enable" in s.h1.virsh("dominfo", g.name).stdout  # as it was
    s.h1.virsh("autostart", "--disable", g.name)
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
    # the source writes on for 3 s after the cycle: at least that much is lost (the point
    # holds the source as of the cycle's start; the loss is measured to the microsecond)
    time.sleep(3)
    s.h1.kill()  # the source site is gone; vmdr now runs at the DR site
    s.config.write_text(s.toml("qemu:///system"))
    src = s.c.ssh_uri(s.h1) + "&known_hosts=/dev/null"
    rep = s.js("failover", "app", "--connect", src, host=s.h2)
    assert rep["outcome"] == "passed", rep
    vm = rep["vms"][0]
    assert vm["point"] == inc["point"] and vm["rpo_s"] >= 3 and "lost" in vm["records_note"]
    start = _wait("the writer at the DR site",
                  lambda: _seqs(s.dr_console(), "start"))
    assert start[-1] > before  # it resumed after every record written before the cycle
    s.h2.virsh("destroy", f"{g.name}-replica")
    raw = s.work / "unplanned-vdb.raw"  # the overlay's backing path exists inside h2 only
    s.h2.run("qemu-img", "convert", "-O", "raw", f"{ROOT}/{g.name}/failover/vdb.qcow2", str(raw))
    rc = check_records(str(raw), "raw")
    assert rc.consistent, rc.problems  # a consistent prefix of the stream
    assert rc.last_seq >= start[-1] - 1 >= before
