"""The boot-order judge of bench/ha.py (bench/_ha_order.py) on constructed timelines.

Times are seconds after the partition, as the bench records them: ``starts`` = first poll
that saw the VM running on a survivor, ``beats`` = first poll that saw a heartbeat of the
new boot on its console. db: group 1, ready delay 1 s; app: group 2, depends on db.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_ha_order", ROOT / "bench" / "_ha_order.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_ha_order"] = mod
    spec.loader.exec_module(mod)
    return mod


order = _load()
RULES = {"db": order.Rule(1, (), 1.0), "app": order.Rule(2, ("db",), 0.0)}


def ev(t: float, kind: str, vm: str) -> dict[str, object]:
    return {"time": t, "kind": kind, "vm": vm, "host": "h1", "reason": "", "detail": {}}


def test_valid_order() -> None:
    v = order.judge_order(RULES, {"db": 7.6, "app": 16.4}, {"db": 14.9, "app": 23.0})
    assert v.ok is True and v.problems == []


def test_released_waiter_is_a_miss() -> None:
    """db's start failed and it was given up: app started long before db's heartbeat."""
    v = order.judge_order(RULES, {"db": 18.0, "app": 7.7}, {"db": 25.1, "app": 15.0})
    assert v.ok is False
    assert "app started 18.40s before db's heartbeat + 1s" in v.problems[0]


def test_leader_stamping_readiness_early_is_a_miss() -> None:
    """The leader recorded db ready at the start of a step whose starts took 2 s: its
    events say app ≥ ready + 1 s, but app ran 0.3 s after db's real heartbeat."""
    starts, beats = {"db": 7.5, "app": 15.3}, {"db": 15.0}
    events = [ev(100 + 13.0, "ready", "db"), ev(100 + 14.1, "started", "app")]
    assert order.leader_events_order(events, "db", "app", 1.0, 99.0) is True
    v = order.judge_order(RULES, starts, beats)
    assert v.ok is False and "db's heartbeat + 1s" in v.problems[0]


def test_within_tolerance_of_the_polls() -> None:
    """The heartbeat was seen one poll late (and the agent answered a moment before the
    console line): app 0.3 s short of heartbeat + delay is still in order."""
    assert order.judge_order(RULES, {"db": 7.0, "app": 15.7}, {"db": 15.0}).ok is True
    assert order.judge_order(RULES, {"db": 7.0, "app": 15.4}, {"db": 15.0}).ok is False


def test_valid_order_the_leader_event_check_rejected() -> None:
    """app's libvirt start call timed out but the domain ran: the leader found it running
    on the retry and wrote `gave-up: not started, running on h3` instead of `started`.
    The old check (leader events) called it a miss; the real times are in order."""
    events = [ev(107.5, "started", "db"), ev(114.2, "ready", "db"),
              ev(115.3, "gave-up", "app")]
    assert order.leader_events_order(events, "db", "app", 1.0, 99.0) is False
    v = order.judge_order(RULES, {"db": 7.6, "app": 15.9}, {"db": 14.1, "app": 23.0})
    assert v.ok is True


def test_a_stall_is_not_an_order_miss() -> None:
    """Neither guest up within the window: the old check counted it as a miss."""
    assert order.leader_events_order([], "db", "app", 1.0, 99.0) is False
    v = order.judge_order(RULES, {}, {})
    assert v.ok is None and "not restarted" in v.problems[0]
    v = order.judge_order(RULES, {"db": 7.0}, {"db": 14.0})  # app never came
    assert v.ok is None


def test_start_without_any_heartbeat_of_what_it_waits_for() -> None:
    v = order.judge_order(RULES, {"db": 7.0, "app": 9.0}, {})
    assert v.ok is False and "had no heartbeat" in v.problems[0]


@pytest.mark.parametrize(("starts", "ok"), [
    ({"a": 1.0, "b": 1.2, "c": 9.5}, True),   # c (group 2) after both of group 1
    ({"a": 1.0, "b": 8.0, "c": 9.5}, False),  # b's heartbeat at 15: c too early
])
def test_priority_groups_without_dependencies(starts: dict[str, float], ok: bool) -> None:
    rules = {"a": order.Rule(1, (), 0.5), "b": order.Rule(1, (), 0.5), "c": order.Rule(2, (), 0.0)}
    beats = {"a": 8.0, "b": 8.5 if starts["b"] < 2 else 15.0}
    assert order.judge_order(rules, starts, beats).ok is ok


def test_dependency_inside_a_group_and_unrelated_vm_of_the_same_group() -> None:
    rules = {"db": order.Rule(1, (), 1.0), "web": order.Rule(1, ("db",), 0.0),
             "mon": order.Rule(1, (), 0.0)}
    # mon (same group, no dependency) may start at once; web waits for db
    v = order.judge_order(rules, {"db": 1.0, "mon": 1.1, "web": 9.2}, {"db": 8.0})
    assert v.ok is True
    v = order.judge_order(rules, {"db": 1.0, "mon": 1.1, "web": 2.0}, {"db": 8.0})
    assert v.ok is False and v.problems[0].startswith("web")


def test_leader_stamps_readiness_when_the_check_passed() -> None:
    """The agent's leader gets its wall clock: a readiness check that passes 2 s into a
    step (slow starts and checks before it) is stamped then, so app waits 1 s from there."""
    from tests.unit.test_ha_leader import HOSTS, live, running, setup
    from vmdr.ha.leader import HALeader

    fleet, ops, store, policy = setup(ready_delay=1.0)
    clock = {"t": 0.0}

    class Slow:
        def where_running(self, vm: str) -> list[str]:
            return ops.where_running(vm)

        def start(self, host: str, xml: str) -> None:
            ops.start(host, xml)

        def ready(self, host: str, vm: str, check: str) -> bool:
            clock["t"] += 2.0  # the check (and what ran before it) took 2 s
            return ops.ready(host, vm, check)

    leader = HALeader(policy, store, Slow(), "h2", clock=lambda: clock["t"])

    def step(t: float, *hosts: str) -> None:
        clock["t"] = t
        leader.step(t, live(*hosts), set(HOSTS))

    step(100.0, *HOSTS)
    fleet.hosts["fake://h1/system"].up = False
    step(101.0, "h2", "h3")
    step(103.0, "h2", "h3")  # fence delay over: db starts
    (db_at,) = running(fleet, "db")
    fleet.hosts[db_at].domains["db"].agent = True
    step(103.25, "h2", "h3")  # the check passes at 105.25
    rec = store.failover("h1")
    assert rec is not None and rec["ready"]["db"] == 105.25
    step(106.0, "h2", "h3")  # 103.25 + 1 s has passed, 105.25 + 1 s has not
    assert running(fleet, "app") == []
    step(106.25, "h2", "h3")
    assert len(running(fleet, "app")) == 1
