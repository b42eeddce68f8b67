"""Failover bring-up with a fake guest: ``tcp:`` readiness is tried at the address re-IP
gives, the DR host's capacity is checked before anything is stopped or started."""

from __future__ import annotations

import ipaddress
from typing import Any, cast

import pytest

from vmdr.errors import DRCapacity
from vmdr.hypervisor.driver import GuestExecResult
from vmdr.jobs import failover as fo
from vmdr.jobs import failover_site as fs
from vmdr.jobs.failover_guest import wait_ready
from vmdr.plan.recovery import GroupSpec, PlanVM, RecoveryPlan, ReIPRule


class Guest:
    """A running guest whose address moves when the re-IP helper runs in it."""

    name = "vmdrt-app-web"

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.calls: list[str] = []

    def is_active(self) -> bool:
        return True

    def guest_ping(self, timeout: float = 3) -> bool:
        self.calls.append("ping")
        return True

    def guest_addresses(self) -> list[str]:
        return [self.addr]

    def guest_exec(self, argv: list[str], timeout: float = 30) -> GuestExecResult:
        old, new = argv[4], argv[5]  # sh -c SCRIPT vmdr-reip OLD/NN NEW/NN ...
        assert old.split("/")[0] == self.addr
        self.calls.append(f"reip {old} {new}")
        self.addr = new.split("/")[0]
        return GuestExecResult(1, 0)


def _plan(ready: str, rules: tuple[ReIPRule, ...]) -> RecoveryPlan:
    pv = PlanVM("web", "qemu+ssh://dr1/system", "dr1", "/srv/r/web", "web-replica", None,
                None, ())
    return RecoveryPlan("app", {"web": pv}, (GroupSpec(1, ("web",), ready, timeout_s=5),),
                        reip_rules=rules)


def _run(plan: RecoveryPlan, tmp: Any, force: bool = False) -> fo.Run:
    return fo.Run(plan, fo.Options("test", str(tmp), force=force),
                  fo.start_report(plan, "test"))


RULE = ReIPRule(ipaddress.IPv4Network("10.99.0.0/24"), ipaddress.IPv4Network("10.99.4.0/24"),
                ipaddress.IPv4Network("10.99.8.0/24"))


def test_tcp_readiness_waits_for_the_agent_then_re_ip_then_the_port(tmp_path: Any) -> None:
    plan = _plan("tcp:8080", (RULE,))
    run = _run(plan, tmp_path)
    guest = Guest("10.99.0.5")
    probed: list[str] = []

    def on_dr(vm: str, addr: str, port: int) -> int:
        probed.append(f"{addr}:{port}")
        return 0 if addr == "10.99.8.5" else 1  # only the test subnet is reachable

    fo.bring_up(run, {}, lambda _n: cast(Any, guest), on_dr, test=True)
    steps = [s.name for s in run.report.steps]
    assert steps == ["start", "wait until ready (agent)", "re-IP",
                     "wait until ready (tcp:8080)"]
    assert guest.calls == ["ping", "reip 10.99.0.5/24 10.99.8.5/24"]
    assert probed == ["10.99.8.5:8080"]  # never the old address
    o = run.report.vm("web")
    assert o.ready == "tcp:8080" and o.addresses == ["10.99.8.5"] and o.outcome == "ready"


def test_without_rules_readiness_is_one_step_and_re_ip_follows_it(tmp_path: Any) -> None:
    run = _run(_plan("agent", ()), tmp_path)
    fo.bring_up(run, {}, lambda _n: cast(Any, Guest("10.0.0.1")), lambda *_a: 1)
    assert [s.name for s in run.report.steps] == ["start", "wait until ready (agent)"]
    run = _run(_plan("agent", (RULE,)), tmp_path)
    fo.bring_up(run, {}, lambda _n: cast(Any, Guest("10.99.0.7")), lambda *_a: 1)
    assert [s.name for s in run.report.steps] == ["start", "wait until ready (agent)",
                                                  "re-IP"]
    assert run.report.vm("web").addresses == ["10.99.4.7"]  # not a test: the DR subnet


def test_a_dr_host_that_cannot_probe_says_so() -> None:
    t = [0.0]

    def clock() -> float:
        t[0] += 1
        return t[0]

    with pytest.raises(Exception, match="neither bash nor nc"):
        wait_ready(cast(Any, Guest("10.99.8.5")), "tcp:80", 3, lambda _a, _p: 127, {},
                   clock=clock, sleep=lambda _s: None)


class _Std:
    def __init__(self, kib: int) -> None:
        self.kib = kib

    def info(self) -> Any:
        return type("I", (), {"memory_kib": self.kib})()


class _HV:
    def __init__(self, free: int | None) -> None:
        self.free = free

    def free_memory(self) -> int | None:
        return self.free


def _vms(free: int | None, *kib: int) -> dict[str, fs.DRVM]:
    hv = _HV(free)
    out = {}
    for i, k in enumerate(kib):
        pv = PlanVM(f"vm{i}", "qemu+ssh://root@dr1/system?keyfile=/k", "dr1", f"/r/vm{i}",
                    f"vm{i}-replica", None, None, ())
        out[pv.name] = cast(fs.DRVM, type("V", (), {"pv": pv, "hv": hv,
                                                     "standby": _Std(k)})())
    return out


def test_capacity_is_refused_in_one_line_before_anything_moves(tmp_path: Any) -> None:
    run = _run(_plan("agent", ()), tmp_path)
    fo._check_capacity(run, _vms(4 << 30, 1 << 20, 2 << 20))  # 3 GiB of 4: fine
    fo._check_capacity(run, _vms(None, 64 << 20))  # unknown free memory: no refusal
    with pytest.raises(DRCapacity) as e:
        fo._check_capacity(run, _vms(2 << 30, 1 << 20, 2 << 20))
    assert e.value.exit_code == 43 and "\n" not in e.value.message
    assert e.value.message.startswith(
        "recovery plan app: the VMs need 3072 MiB of memory at qemu+ssh://root@dr1/system, "
        "which has 2048 MiB free: nothing was stopped or started")
    assert "keyfile" not in e.value.message
    forced = _run(_plan("agent", ()), tmp_path, force=True)
    fo._check_capacity(forced, _vms(2 << 30, 1 << 20, 2 << 20))
    assert forced.report.warnings and forced.report.warnings[0].endswith("(forced)")
