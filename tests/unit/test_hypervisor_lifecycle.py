"""Define/start/heartbeat helpers against the fake libvirt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit import fakelibvirt as fl
from vmdr.errors import HeartbeatTimeout, HypervisorError
from vmdr.hypervisor import connect, rewrite_domain_xml


@pytest.fixture(autouse=True)
def fake() -> Iterator[Any]:
    yield fl.install()
    fl.uninstall()


def test_wait_heartbeat_agent_and_console(tmp_path: Path) -> None:
    dom = fl.add_domain(fl.domain_xml("r", ""))
    hv = connect()
    handle = hv.lookup("r")
    now = [0.0]
    answers: Iterator[dict[str, Any] | None] = iter([None, None, {}])

    def agent(cmd: dict[str, Any]) -> Any:
        if next(answers) is None:
            raise fl.libvirtError("not yet", fl.VIR_ERR_AGENT_UNRESPONSIVE)
        return {}

    dom.agent = agent
    def sleep(s: float) -> None:
        now[0] += s

    took = handle.wait_heartbeat(timeout=10, poll=2, clock=lambda: now[0], sleep=sleep)
    assert took == 4.0

    log = tmp_path / "console.log"
    log.write_text("booting\nvmdr-guest: heartbeat 1\n")
    dom.agent = None
    took = handle.wait_heartbeat(agent=False, console_pattern=r"heartbeat \d+",
                                    console_log=str(log), clock=lambda: now[0], sleep=sleep)
    assert took == 0.0
    with pytest.raises(HeartbeatTimeout):
        handle.wait_heartbeat(timeout=3, poll=1, clock=lambda: now[0], sleep=sleep)
    dom.active = False
    with pytest.raises(HypervisorError, match="stopped before"):
        hv.wait_heartbeat("r", timeout=3)


def test_define_start_destroy_undefine() -> None:
    fl.host()
    hv = connect()
    xml = rewrite_domain_xml(fl.domain_xml("orig", fl.disk_xml("vda", "/a.qcow2")),
                             new_name="copy", disk_paths={"vda": ("/r/vda.raw", "raw")})
    assert hv.define(xml) == "copy"
    info = hv.domain("copy")
    assert info.state == "stopped" and info.disk("vda").source == "/r/vda.raw"
    hv.start("copy")
    assert hv.domain("copy").running
    hv.destroy("copy")
    hv.destroy("copy")  # idempotent
    hv.undefine("copy")
    assert hv.list_domains() == []
