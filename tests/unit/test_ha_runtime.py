"""The agent's HA wiring: when HA is on, the [ha] lease governs, and the libvirt checks
skip dead or hanging hosts instead of waiting for them."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from vmdr import config
from vmdr.agent import ha_runtime
from vmdr.agent.coord_etcd import EtcdCoordinator
from vmdr.agent.ha_runtime import LibvirtOps, make_ha_runtime
from vmdr.hypervisor.fake import FakeFleet

CFG = """
connect = "qemu:///system"
[agent]
host = "h1"
state = "{d}/agent.db"
etcd = ["http://127.0.0.1:1"]
[locations.dc]
kind = "building"
[hosts.h1]
location = "dc"
[hosts.h2]
location = "dc"
uri = "qemu+tcp://h2.example/system"
{ha}
[vm.db]
ha = {on}
"""


def load(tmp_path: Path, ha: str = "[ha]\nlease_ttl = \"6s\"", on: str = "true"
         ) -> config.Config:
    p = tmp_path / "vmdr.toml"
    p.write_text(CFG.format(d=tmp_path, ha=ha, on=on))
    return config.load(str(p))


def test_make_runtime(tmp_path: Path) -> None:
    coord = EtcdCoordinator(["http://127.0.0.1:1"], 10)
    rt = make_ha_runtime(load(tmp_path), "h1", coord)
    assert rt is not None and coord.ttl == 6  # the [ha] lease replaces [agent] lease_ttl
    assert rt.ops.uris == {"h1": "qemu:///system", "h2": "qemu+tcp://h2.example/system"}
    assert rt.settings.self_fence_after == 4.5
    assert make_ha_runtime(load(tmp_path, ha=""), "h1", coord) is None
    assert make_ha_runtime(load(tmp_path, on="false"), "h1", coord) is None


def test_where_running_skips_dead_and_hanging_hosts(monkeypatch: object) -> None:
    fleet = FakeFleet()
    for h in ("h1", "h2", "h3"):
        fleet.host(f"fake://{h}/system")
    fleet.host("fake://h1/system").add_domain("<domain><name>db</name></domain>",
                                              active=True)
    fleet.hosts["fake://h2/system"].up = False  # connect raises at once
    release = threading.Event()

    def connect(uri: str):  # type: ignore[no-untyped-def]
        if "h3" in uri:
            release.wait(10)  # a partitioned host: the TCP connect hangs
        return fleet.connect(uri)

    ops = LibvirtOps({h: f"fake://{h}/system" for h in ("h1", "h2", "h3")}, connect)
    t0 = time.monotonic()
    assert ops.where_running("db") == ["h1"]
    assert time.monotonic() - t0 < ha_runtime.CHECK_TIMEOUT + 1.0
    assert ops.where_running("other") == []
    release.set()


ADMISSION = """
connect = "qemu:///system"
[agent]
host = "h1"
state = "{d}/agent.db"
etcd = ["http://127.0.0.1:1"]
[locations.dc]
kind = "building"
[hosts.h1]
location = "dc"
vcpus = 4
memory = "4GiB"
[hosts.h2]
location = "dc"
uri = "qemu+tcp://h2.example/system"
vcpus = 4
memory = "8GiB"
[ha]
admission = "{mode}"
[vm.db]
ha = true
host = "h1"
vcpus = 1
memory = "1GiB"
[vm.big]
ha = true
host = "h2"
vcpus = 1
memory = "3584MiB"
"""


def test_admission_at_config_load_refuses_or_warns(tmp_path: Path, caplog: Any) -> None:
    """docs/operations.md: admission = "refuse" leaves the VM that breaks N+1 out of the
    agent's HA (one error line); "warn" keeps it (one warning line)."""
    coord = EtcdCoordinator(["http://127.0.0.1:1"], 10)
    p = tmp_path / "vmdr.toml"
    p.write_text(ADMISSION.format(d=tmp_path, mode="refuse"))
    with caplog.at_level(logging.WARNING, logger="vmdr"):
        rt = make_ha_runtime(config.load(str(p)), "h1", coord)
    assert rt is not None and set(rt.policy.vms) == {"db"}
    lines = [r for r in caplog.records if "admission" in r.getMessage()]
    assert [(r.levelname, "big" in r.getMessage()) for r in lines] == [("ERROR", True)]
    assert "\n" not in lines[0].getMessage() and "if h" in lines[0].getMessage()
    caplog.clear()
    p.write_text(ADMISSION.format(d=tmp_path, mode="warn"))
    with caplog.at_level(logging.WARNING, logger="vmdr"):
        rt = make_ha_runtime(config.load(str(p)), "h1", coord)
    assert rt is not None and set(rt.policy.vms) == {"db", "big"}
    lines = [r for r in caplog.records if "admission" in r.getMessage()]
    assert [(r.levelname, "big" in r.getMessage()) for r in lines] == [("WARNING", True)]


def test_dead_cached_connection_is_replaced() -> None:
    """libvirt's keepalive closes a connection while the hosts are cut off: the next
    start reconnects and starts once; a readiness check drops it so the next one
    reconnects (before: start failed at once, readiness stayed False until its timeout)."""
    fleet = FakeFleet()
    fleet.host("fake://h1/system")
    ops = LibvirtOps({"h1": "fake://h1/system"}, fleet.connect)
    ops._conn("h1").close()
    x = ("<domain type='kvm'><name>db</name><memory unit='KiB'>1024</memory><vcpu>1</vcpu>"
         "<os><type>hvm</type></os><devices/></domain>")
    ops.start("h1", x)
    assert fleet.hosts["fake://h1/system"].domains["db"].active
    ops.start("h1", x)  # idempotent on the same host: already running, not started again
    fleet.hosts["fake://h1/system"].domains["db"].agent = True
    ops._conn("h1").close()
    assert not ops.ready("h1", "db", "agent")
    assert ops.ready("h1", "db", "agent")
