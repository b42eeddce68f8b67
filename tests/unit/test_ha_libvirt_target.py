"""A host whose libvirt is down is alive but no target (FakeFleet + in-memory store), and a
start that keeps failing on its target moves to the next eligible host."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.unit.test_ha_cli import estate
from tests.unit.test_ha_leader import HOSTS, running, setup
from tests.unit.test_ha_leader_repeat import Refusing
from vmdr import config
from vmdr.agent.coord import Member
from vmdr.cli.ha_engine_cmds import status_data
from vmdr.ha import admission
from vmdr.ha.failover import failover_plan
from vmdr.ha.fleet import state_from_members
from vmdr.ha.leader import START_ATTEMPTS, HALeader, LiveHost
from vmdr.ha.model import HostState, load_policy
from vmdr.ha.records import HARecords
from vmdr.ha.store import HAStore, MemoryKV
from vmdr.plan import inventory

H1, H2, H3 = (f"fake://{h}/system" for h in HOSTS)


def fleet_live(lv_down: str = "") -> dict[str, LiveHost]:
    # h2 has the most memory: the placement's first choice unless its libvirt is down
    return {"h2": LiveHost("h2", 8, 32768, libvirt_ok=lv_down != "h2"),
            "h3": LiveHost("h3", 8, 8192, libvirt_ok=lv_down != "h3")}


def drive(leader: HALeader, fleet: Any, until: float, live: dict[str, LiveHost]) -> None:
    t = 1.0
    while t < until:
        leader.step(t, live, set(HOSTS))
        for vm in ("db", "app"):
            for u in running(fleet, vm):
                fleet.hosts[u].domains[vm].agent = True
            assert len(running(fleet, vm)) <= 1
        t += 0.25


def test_libvirt_down_host_is_no_failover_target() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    fleet.hosts[H1].up = False
    leader = HALeader(policy, store, ops, "h3")
    drive(leader, fleet, 10.0, fleet_live(lv_down="h2"))
    assert running(fleet, "db") == [H3] and running(fleet, "app") == [H3]
    rec = store.failover("h1")
    assert rec is not None and rec["done"]
    assert {d["host"] for d in rec["plan"]["starts"]} == {"h3"}
    # h2 itself is no failover: alive, nothing detected for it
    assert not [e for e in store.events() if e.host == "h2"]


def test_libvirt_down_everywhere_says_why() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    fleet.hosts[H1].up = False
    leader = HALeader(policy, store, ops, "h3")
    live = {"h2": LiveHost("h2", 8, 32768, libvirt_ok=False)}
    leader.step(1.0, live, set(HOSTS))
    leader.step(3.0, live, set(HOSTS))
    rec = store.failover("h1")
    assert rec is not None and not rec["plan"]["starts"]
    reasons = {u["vm"]: u["reason"] for u in rec["plan"]["unplaced"]}
    assert set(reasons) == {"db", "app"} and "h2: libvirt down, no target" in reasons["db"]
    assert running(fleet, "db") == []


def test_start_failing_on_its_target_moves_to_the_next_host() -> None:
    """db is placed on h2 (most memory); h2's libvirt refuses every start of it: after
    START_ATTEMPTS it is placed on h3 and started there once, the event says why; app
    still waits for db's readiness."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    fleet.hosts[H1].up = False

    class RefuseOnH2(Refusing):
        def start(self, host: str, xml_: str) -> None:
            if host == "h2" and "<name>db</name>" in xml_:
                self.tries += 1
                raise RuntimeError("internal error: cannot open /dev/kvm")
            self.ops.start(host, xml_)

    refusing = RefuseOnH2(ops, "db")
    leader = HALeader(policy, store, refusing, "h3")
    drive(leader, fleet, 12.0, fleet_live())
    assert refusing.tries == START_ATTEMPTS
    assert running(fleet, "db") == [H3]
    assert running(fleet, "app") in ([H2], [H3])
    rec = store.failover("h1")
    assert rec is not None and rec["done"] and set(rec["ready"]) == {"db", "app"}
    assert rec["start_errors"]["db"]["tried"] == ["h2"]
    placed = [e for e in store.events() if e.kind == "placed" and e.vm == "db"]
    assert [e.host for e in placed] == ["h2", "h3"]
    assert "start on h2 failed 3 times: internal error: cannot open /dev/kvm" \
        in placed[-1].reason
    kinds = [(e.kind, e.vm) for e in store.events()]
    assert ("gave-up", "db") not in kinds
    assert kinds.index(("ready", "db")) < kinds.index(("started", "app"))


def test_start_failing_everywhere_gives_up_with_the_hosts_tried() -> None:
    fleet, ops, store, policy = setup(ready_delay=0.0)
    fleet.hosts[H1].up = False
    refusing = Refusing(ops, "db")  # every host refuses db
    leader = HALeader(policy, store, refusing, "h3")
    drive(leader, fleet, 15.0, fleet_live())
    assert refusing.tries == 2 * START_ATTEMPTS
    assert running(fleet, "db") == [] and len(running(fleet, "app")) == 1
    gave = [e for e in store.events() if e.kind == "gave-up" and e.vm == "db"]
    assert len(gave) == 1 and "start on h3 failed 3 times" in gave[0].reason
    assert "no other host fits" in gave[0].reason
    assert gave[0].detail["tried"] == ["h2", "h3"]


def test_start_without_answer_is_never_moved() -> None:
    """No answer at all: it may run there (unreachable libvirt is skipped by the re-check),
    so it is never started elsewhere — no double run."""
    fleet, ops, store, policy = setup(ready_delay=0.0)
    fleet.hosts[H1].up = False

    class Hanging(Refusing):
        def start(self, host: str, xml_: str) -> None:
            if "<name>db</name>" in xml_:
                self.tries += 1
                raise TimeoutError(f"no answer from {host}'s libvirt within 30s")
            self.ops.start(host, xml_)

    hanging = Hanging(ops, "db")
    leader = HALeader(policy, store, hanging, "h3")
    drive(leader, fleet, 12.0, fleet_live())
    assert hanging.tries == START_ATTEMPTS and running(fleet, "db") == []
    gave = [e for e in store.events() if e.kind == "gave-up" and e.vm == "db"]
    assert len(gave) == 1 and "it may run there" in gave[0].reason


def test_member_record_carries_libvirt_health() -> None:
    m = Member("h2", "http://h2:8470", 8, 8192, libvirt_ok=False, libvirt_down=5.0,
               libvirt_error="Failed to connect socket")
    d = json.loads(json.dumps(m.as_dict()))
    assert d["libvirt_ok"] is False and d["libvirt_error"] == "Failed to connect socket"
    back = Member(**{k: v for k, v in d.items() if k in Member.__dataclass_fields__})
    assert back == m
    assert HostState("h2", 8, 1 << 30, libvirt=False).eligible is False


def _members(store: HAStore, rows: dict[str, Member]) -> None:
    for h, m in rows.items():
        store.kv.put(f"{store.prefix}members/{h}", json.dumps(m.as_dict()))


def test_status_and_headroom_count_a_libvirt_down_host_out() -> None:
    _fleet, _ops, store, policy = setup(ready_delay=0.0)
    members = [Member("h1", "", 8, 8192, ["db", "app"]),
               Member("h2", "", 8, 32768, libvirt_ok=False, libvirt_down=100.0,
                      libvirt_error="Failed to connect socket to libvirt-sock"),
               Member("h3", "", 8, 8192)]
    d = status_data(policy, list(HOSTS), members, "h3", store)
    hosts = {h["host"]: h for h in d["hosts"]}
    assert hosts["h2"]["lease"] and hosts["h2"]["libvirt"]["ok"] is False
    assert hosts["h2"]["libvirt"]["since"] == 100.0 and hosts["h3"]["libvirt"] == {"ok": True}
    assert {v["vm"]: v["would_go_to"] for v in d["vms"]} == {"db": "h3", "app": "h3"}
    ok = status_data(policy, list(HOSTS), [members[0], Member("h2", "", 8, 32768),
                                           members[2]], "h3", store)
    assert {v["would_go_to"] for v in ok["vms"]} == {"h2"}  # most memory when it answers



def test_members_state_and_admission_count_a_libvirt_down_host_out(tmp_path: Path) -> None:
    """The inventory side (dashboard, ``ha validate``, the DR plan's facts) reads the
    agents' member keys: a libvirt-down host is up but no target, and N+1 headroom
    counts it out."""
    inv = inventory.from_config(config.parse(tomllib.loads(estate(tmp_path).read_text()),
                                             "estate.toml"))
    policy = load_policy(inv)
    records = HARecords(HAStore(MemoryKV(), "/vmdr/", me="t"))

    def state(down: set[str]) -> Any:
        _members(records.store, {h: Member(h, "", 8, 16384, sorted(
            v.name for v in inv.vms.values() if v.host == h), libvirt_ok=h not in down,
                                           libvirt_error="no socket" if h in down else "")
                                 for h in inv.hosts})
        return state_from_members(inv, records)

    st, notes = state(set())
    assert admission.check(policy, st).ok
    st, notes = state({"hv3"})
    assert st.hosts["hv3"].up and not st.hosts["hv3"].eligible
    assert any("hv3: its libvirt does not answer (no socket)" in n for n in notes)
    plan = failover_plan(policy, st, {"hv2"})
    assert plan.starts and all(s.host != "hv3" for s in plan.starts)
    st, _ = state({"hv2", "hv3"})
    adm = admission.check(policy, st)
    assert not adm.ok and any("hv1" in p for p in adm.problems()), adm.problems()


def test_simulate_libvirt_down_is_no_target(tmp_path: Path) -> None:
    cfg = estate(tmp_path)

    def sim(*args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg),
                            "ha", "simulate", *args], capture_output=True, text=True,
                           check=False)
        assert "Traceback" not in p.stderr, p.stderr
        return p

    p = sim("--fail", "hv2", "--json")
    assert {s["vm"]: s["host"] for s in json.loads(p.stdout)["starts"]}["web"] == "hv3"
    p = sim("--fail", "hv2", "--libvirt-down", "hv3", "--json")
    plan = json.loads(p.stdout)
    assert plan["libvirt_down"] == ["hv3"]
    assert all(s["host"] != "hv3" for s in plan["starts"]), plan
    p = sim("--fail", "hv2", "--libvirt-down", "hv1,hv3")
    assert p.returncode == 1
    assert "libvirt down on hv1, hv3: no target" in p.stdout
    assert "hv1, hv3: libvirt down, no target" in p.stdout
    p = sim("--fail", "hv2", "--libvirt-down", "hv7")
    assert p.returncode == 2 and p.stderr.startswith("vmdr: error: --libvirt-down: unknown")


def test_runtime_reports_its_libvirt_down_and_back(tmp_path: Path) -> None:
    """The agent's HA runtime: a failed local listing sets ``libvirt_down`` (what the
    daemon puts in its member key) with the error, once libvirt answers it is cleared."""
    from tests.unit.test_ha_runtime import load
    from vmdr.agent.coord_etcd import EtcdCoordinator
    from vmdr.agent.ha_runtime import HARuntime, LibvirtOps
    from vmdr.hypervisor.fake import FakeFleet

    fleet = FakeFleet()
    fleet.host("fake://h1/system")
    rt = HARuntime("h1", load_policy(inventory.from_config(load(tmp_path))),
                   EtcdCoordinator(["http://127.0.0.1:1"], 10),
                   HAStore(MemoryKV(), "/vmdr/", me="h1"),
                   LibvirtOps({"h1": "fake://h1/system"}, fleet.connect), watchdog=None)
    rt.publish(10.0)
    assert rt.libvirt_down is None and rt.libvirt_error == ""
    fleet.hosts["fake://h1/system"].up = False  # libvirtd killed
    rt.publish(12.0)
    assert rt.libvirt_down == 12.0 and rt.libvirt_error
    rt.publish(14.0)
    assert rt.libvirt_down == 12.0  # since when, not last seen
    fleet.hosts["fake://h1/system"].up = True
    rt.publish(16.0)
    assert rt.libvirt_down is None and rt.libvirt_error == ""
    states = [(e.detail or {}).get("libvirt") for e in rt.store.events()]
    assert states == ["unreachable", "reachable"]
