"""Placement, boot order and admission control as pure functions: examples, invariants
(hypothesis) and the 50 hosts × 40 VMs scale bound."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from vmdr.ha import admission
from vmdr.ha.boot import due
from vmdr.ha.failover import failover_plan
from vmdr.ha.model import HAVM, ClusterState, HAPolicy, HostState, Readiness, VMState
from vmdr.ha.placement import free_capacity
from vmdr.ha.settings import HASettings

GiB = 1 << 30


def cluster(hosts: Mapping[str, tuple[int, int, str | None]],
            vms: list[dict[str, object]], *, overcommit: float = 1.0,
            scopes: tuple[tuple[str, str], ...] = (), tolerated: int = 1,
            maintenance: frozenset[str] = frozenset()) -> tuple[HAPolicy, ClusterState]:
    """hosts: name -> (vcpus, memory GiB, rack); vms: dicts with name, host, vcpus, mem
    (GiB), and optionally prio, deps, group, hosts, rule, ha (default True)."""
    rules, states, groups = {}, {}, {}
    for v in vms:
        name = str(v["name"])
        if v.get("group"):
            groups[name] = str(v["group"])
        if v.get("ha", True):
            rules[name] = HAVM(name, int(v.get("prio", 1)),  # type: ignore[call-overload]
                               tuple(v.get("deps", ())),  # type: ignore[arg-type]
                               v.get("group"),  # type: ignore[arg-type]
                               tuple(v.get("hosts", ())),  # type: ignore[arg-type]
                               str(v.get("rule", "must")))
        states[name] = VMState(name, str(v["host"]), int(v["vcpus"]),  # type: ignore[call-overload]
                               int(v["mem"] * GiB))  # type: ignore[operator]
    policy = HAPolicy(HASettings(anti_affinity_scopes=scopes, host_failures_tolerated=tolerated),
                      rules, {h: r for h, (_, _, r) in hosts.items()}, overcommit, groups)
    state = ClusterState({h: HostState(h, c, m * GiB, True, h in maintenance)
                          for h, (c, m, _) in hosts.items()}, states)
    return policy, state


THREE = {"hv1": (8, 16, "r1"), "hv2": (8, 16, "r1"), "hv3": (8, 16, "r2")}


def test_most_free_memory_first_and_deterministic() -> None:
    policy, state = cluster(THREE, [
        {"name": "a", "host": "hv1", "vcpus": 2, "mem": 4},
        {"name": "b", "host": "hv2", "vcpus": 2, "mem": 8},
    ])
    plan = failover_plan(policy, state, {"hv1"})
    assert plan.placement.placed == {"a": "hv3"}  # hv3 16 GiB free, hv2 8 GiB
    assert failover_plan(policy, state, {"hv1"}).placement.placed == plan.placement.placed


def test_memory_is_never_overcommitted_vcpus_are() -> None:
    vms = [{"name": "big", "host": "hv1", "vcpus": 12, "mem": 10},
           {"name": "fill", "host": "hv2", "vcpus": 1, "mem": 10}]
    policy, state = cluster({"hv1": (8, 16, None), "hv2": (8, 16, None)}, vms)
    p = failover_plan(policy, state, {"hv1"}).placement
    assert p.unplaced["big"] == "needs 10.0 GiB memory, at most 6.0 GiB free (hv2)"
    vms[1]["mem"] = 2
    policy, state = cluster({"hv1": (8, 16, None), "hv2": (8, 16, None)}, vms)
    assert "needs 12 vCPUs, at most 7 free" in failover_plan(policy, state, {"hv1"}) \
        .placement.unplaced["big"]
    policy, state = cluster({"hv1": (8, 16, None), "hv2": (8, 16, None)}, vms, overcommit=2)
    assert failover_plan(policy, state, {"hv1"}).placement.placed == {"big": "hv2"}


def test_must_and_should_affinity() -> None:
    vms = [{"name": "lic", "host": "hv1", "vcpus": 1, "mem": 1, "hosts": ["hv2"]},
           {"name": "pref", "host": "hv1", "vcpus": 1, "mem": 1, "hosts": ["hv2"],
            "rule": "should"}]
    policy, state = cluster(THREE, vms)
    assert failover_plan(policy, state, {"hv1"}).placement.placed == {"lic": "hv2",
                                                                        "pref": "hv2"}
    plan = failover_plan(policy, state, {"hv1", "hv2"})
    assert plan.placement.placed == {"pref": "hv3"}
    assert plan.placement.unplaced["lic"].startswith("must run on hv2 (vm.lic.hosts)")
    assert any("none of its preferred hosts (hv2)" in n for n in plan.placement.notes)


def test_anti_affinity_host_and_rack_scope() -> None:
    vms = [{"name": "db1", "host": "hv1", "vcpus": 1, "mem": 1, "group": "db"},
           {"name": "db2", "host": "hv3", "vcpus": 1, "mem": 1, "group": "db"}]
    policy, state = cluster(THREE, vms)
    assert failover_plan(policy, state, {"hv1"}).placement.placed == {"db1": "hv2"}
    policy, state = cluster(THREE, vms, scopes=(("db", "rack"),))
    p = failover_plan(policy, state, {"hv3"}).placement
    assert p.unplaced["db2"].startswith("anti-affinity group 'db': hv1, hv2 already have a "
                                        "member on their rack")
    # a non-HA member still keeps others away
    vms.append({"name": "db3", "host": "hv2", "vcpus": 1, "mem": 1, "group": "db",
                "ha": False})
    policy, state = cluster(THREE, vms)
    assert "db1" in failover_plan(policy, state, {"hv1"}).placement.unplaced


def test_maintenance_hosts_are_no_targets() -> None:
    policy, state = cluster(THREE, [{"name": "a", "host": "hv1", "vcpus": 1, "mem": 1}],
                            maintenance=frozenset({"hv3"}))
    assert failover_plan(policy, state, {"hv1"}).placement.placed == {"a": "hv2"}
    plan = failover_plan(policy, state, {"hv1", "hv2"})
    assert plan.placement.unplaced["a"] == \
        "no host is up, out of maintenance and of known capacity"


def test_low_priority_is_left_out_when_short() -> None:
    vms = [{"name": "low", "host": "hv1", "vcpus": 1, "mem": 6, "prio": 3},
           {"name": "high", "host": "hv1", "vcpus": 1, "mem": 6, "prio": 1}]
    policy, state = cluster({"hv1": (8, 16, None), "hv2": (8, 8, None)}, vms)
    p = failover_plan(policy, state, {"hv1"})
    assert p.placement.placed == {"high": "hv2"} and list(p.placement.unplaced) == ["low"]
    assert not p.ok


def test_non_ha_vms_stay_down() -> None:
    policy, state = cluster(THREE, [{"name": "x", "host": "hv1", "vcpus": 1, "mem": 1,
                                     "ha": False}])
    plan = failover_plan(policy, state, {"hv1"})
    assert plan.not_protected == ["x"] and plan.starts == [] and plan.ok


def test_boot_plan_stages_and_waits() -> None:
    vms = [{"name": "db", "host": "hv1", "vcpus": 1, "mem": 1, "prio": 1},
           {"name": "cache", "host": "hv1", "vcpus": 1, "mem": 1, "prio": 1, "deps": ["db"]},
           {"name": "app", "host": "hv1", "vcpus": 1, "mem": 1, "prio": 2,
            "deps": ["cache", "ext"]},
           {"name": "ext", "host": "hv2", "vcpus": 1, "mem": 1, "prio": 1, "ha": False}]
    policy, state = cluster(THREE, vms)
    plan = failover_plan(policy, state, {"hv1", "hv2"})
    order = [(s.vm, s.stage, s.after) for s in plan.starts]
    assert order == [("db", 0, ()), ("cache", 1, ("db",)), ("app", 2, ("cache", "db"))]
    assert plan.starts[2].missing == ("ext",)
    assert plan.not_protected == ["ext"]


def test_due_follows_readiness_delay_and_timeout() -> None:
    vms = [{"name": "db", "host": "hv1", "vcpus": 1, "mem": 1, "prio": 1},
           {"name": "app", "host": "hv1", "vcpus": 1, "mem": 1, "prio": 2}]
    policy, state = cluster(THREE, vms)
    policy = replace(policy, vms={**policy.vms, "db": replace(
        policy.vms["db"], ready=Readiness("agent", 10.0, 60.0))})
    plan = failover_plan(policy, state, {"hv1"}).starts
    assert [s.vm for s in due(plan, now=0, started={}, ready_at={})] == ["db"]
    assert due(plan, now=5, started={"db": 0}, ready_at={}) == []
    assert due(plan, now=12, started={"db": 0}, ready_at={"db": 4}) == []  # delay: 4+10
    assert [s.vm for s in due(plan, now=14, started={"db": 0}, ready_at={"db": 4})] == ["app"]
    assert [s.vm for s in due(plan, now=60, started={"db": 0}, ready_at={})] == ["app"]


def test_admission_n_plus_one() -> None:
    vms = [{"name": f"v{i}", "host": f"hv{i % 3 + 1}", "vcpus": 1, "mem": 6} for i in range(3)]
    policy, state = cluster(THREE, vms)
    a = admission.check(policy, state)
    assert a.ok and a.scenarios == 3 and a.exhaustive and a.worst is not None
    assert a.worst.spare_memory == (10 + 10 - 6) * GiB
    assert not admission.check(policy, state, k=2).ok
    big = HAVM("big", 1)
    refused = admission.admit(policy, state, big, VMState("big", "hv1", 1, 11 * GiB))
    assert not refused.ok
    assert refused.problems()[0].startswith("if hv1 fails: ")
    assert admission.admit(policy, state, big, VMState("big", "hv1", 1, 2 * GiB)).ok


# -- invariants ---------------------------------------------------------------------------

@st.composite
def clusters(draw: st.DrawFn) -> tuple[HAPolicy, ClusterState, set[str]]:
    n_hosts = draw(st.integers(1, 7))
    hosts = {f"h{i}": (draw(st.integers(1, 16)), draw(st.integers(1, 32)),
                       draw(st.sampled_from(["r1", "r2", "r3", None])))
             for i in range(n_hosts)}
    vms: list[dict[str, object]] = []
    for i in range(draw(st.integers(0, 24))):
        prio = draw(st.integers(1, 3))
        earlier = [v["name"] for v in vms if int(v["prio"]) <= prio]  # type: ignore[call-overload]
        vm: dict[str, object] = {
            "name": f"v{i}", "host": draw(st.sampled_from(sorted(hosts))),
            "vcpus": draw(st.integers(0, 8)), "mem": draw(st.integers(0, 12)), "prio": prio,
            "deps": draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True))
            if earlier else [],
            "group": draw(st.sampled_from([None, None, "g1", "g2"])),
            "ha": draw(st.booleans()) or draw(st.booleans()),
        }
        if draw(st.integers(0, 3)) == 0:
            vm["hosts"] = draw(st.lists(st.sampled_from(sorted(hosts)), min_size=1,
                                        unique=True))
            vm["rule"] = draw(st.sampled_from(["must", "should"]))
        vms.append(vm)
    scopes = (("g1", "rack"),) if draw(st.booleans()) else ()
    maint = frozenset(draw(st.lists(st.sampled_from(sorted(hosts)), max_size=2)))
    policy, state = cluster(hosts, vms, overcommit=draw(st.sampled_from([1.0, 1.5, 4.0])),
                            scopes=scopes, maintenance=maint)
    failed = set(draw(st.lists(st.sampled_from(sorted(hosts)), min_size=1, max_size=3)))
    return policy, state, failed


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_placement_invariants(case: tuple[HAPolicy, ClusterState, set[str]]) -> None:
    policy, state, failed = case
    plan = failover_plan(policy, state, failed)
    p = plan.placement
    victims = {v.name for v in state.vms.values() if v.host in failed and v.name in policy.vms}
    assert set(p.placed) | set(p.unplaced) == victims
    assert not set(p.placed) & set(p.unplaced)
    assert all(p.unplaced.values())  # every refusal says why
    after = state.fail(failed)
    free = free_capacity(policy, after)
    for vm, host in p.placed.items():
        h = state.hosts[host]
        assert host not in failed and not h.maintenance  # never onto failed/maintenance
        rule = policy.vms[vm]
        if rule.affinity_hosts and rule.hosts_rule == "must":
            assert host in rule.affinity_hosts
    for host, f in free.items():  # only free capacity is used; memory never overcommitted
        on = [vm for vm, h in p.placed.items() if h == host]
        if on:
            assert sum(state.vms[vm].memory for vm in on) <= f.memory
            assert sum(state.vms[vm].vcpus for vm in on) <= f.vcpus + 1e-9
    for group in {g for g in policy.groups.values()}:  # anti-affinity: one member per unit
        units = [policy.unit(group, v.host) for v in after.vms.values()
                 if v.running and v.host and policy.groups.get(v.name) == group]
        units += [policy.unit(group, h) for vm, h in p.placed.items()
                  if policy.groups.get(vm) == group]
        placed_units = [policy.unit(group, h) for vm, h in p.placed.items()
                        if policy.groups.get(vm) == group]
        for u in placed_units:
            assert units.count(u) == 1, (group, u, units)
    stage = {s.vm: s for s in plan.starts}
    for s in plan.starts:  # boot order: dependencies and earlier groups come first
        for dep in s.after:
            assert stage[dep].stage < s.stage
        for dep in policy.vms[s.vm].depends_on:
            if dep in stage:
                assert stage[dep].stage < s.stage and dep in s.after
    assert [s.priority for s in plan.starts] == sorted(s.priority for s in plan.starts)
    assert failover_plan(policy, state, failed).to_json() == plan.to_json()  # deterministic


# -- scale --------------------------------------------------------------------------------

def test_scale_50_hosts_40_vms_each_under_a_second() -> None:
    hosts = {f"hv{i:02}": (64, 512, f"r{i // 10}") for i in range(50)}
    vms: list[dict[str, object]] = []
    for i in range(50):
        for j in range(40):
            n = f"vm{i:02}-{j:02}"
            vms.append({"name": n, "host": f"hv{i:02}", "vcpus": 1 + j % 4,
                        "mem": 2 + j % 8, "prio": 1 + j % 3,
                        "group": f"g{j % 5}-{i % 7}" if j < 10 else None,
                        "deps": [f"vm{i:02}-{j - 3:02}"] if j >= 3 and j % 3 == 0 else [],
                        "hosts": [f"hv{(i + k) % 50:02}" for k in range(1, 6)] if j % 9 == 0
                        else [], "rule": "should"})
    policy, state = cluster(hosts, vms, overcommit=4.0)
    t0 = time.perf_counter()
    plan = failover_plan(policy, state, {"hv07"})
    took = time.perf_counter() - t0
    assert plan.ok and len(plan.starts) == 40
    assert took <= 1.0, f"placement of 40 VMs on 49 hosts took {took:.2f}s"
    t0 = time.perf_counter()
    adm = admission.check(policy, state)
    assert adm.ok and adm.scenarios == 50
    assert time.perf_counter() - t0 <= 10.0
