"""The HA policy from the one inventory: defaults, timings, and every bad input giving one
line that names the key (exit 2 through the CLI)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vmdr import config
from vmdr.errors import ConfigError
from vmdr.ha.failover import must_self_fence, restart_allowed
from vmdr.ha.model import load_policy
from vmdr.ha.settings import FENCE_KILL_BUDGET, HASettings
from vmdr.plan import inventory

BASE = """
[locations.b1]
kind = "building"
[locations.r1]
kind = "rack"
parent = "b1"
[locations.r2]
kind = "rack"
parent = "b1"
[hosts.hv1]
location = "r1"
vcpus = 8
memory = "16GiB"
[hosts.hv2]
location = "r1"
vcpus = 8
memory = "16GiB"
[hosts.hv3]
location = "r2"
vcpus = 8
memory = "16GiB"
[plan.tiers.gold]
ha = true
[vm.db1]
host = "hv1"
tier = "gold"
vcpus = 2
memory = "4GiB"
[vm.app1]
host = "hv2"
tier = "gold"
vcpus = 2
memory = "2GiB"
depends_on = ["db1"]
boot_group = 2
[vm.batch]
host = "hv3"
vcpus = 1
memory = "1GiB"
"""

PATH = "estate.toml"


def policy(extra: str = ""):  # type: ignore[no-untyped-def]
    cfg = config.parse(tomllib.loads(BASE + extra), PATH)
    return load_policy(inventory.from_config(cfg))


def error(extra: str) -> str:
    with pytest.raises(ConfigError) as ei:
        policy(extra)
    msg = ei.value.message
    assert msg.startswith(f"{PATH}: ") and "\n" not in msg, msg
    assert ei.value.exit_code == 2
    return msg.split(": ", 1)[1]


def test_defaults_and_tier_inheritance() -> None:
    p = policy()
    assert sorted(p.vms) == ["app1", "db1"]  # tier gold; batch has no HA
    assert p.settings == HASettings()
    assert p.vms["app1"].priority == 2 and p.vms["app1"].depends_on == ("db1",)
    assert p.vms["db1"].ready.check == "agent" and p.vms["db1"].ready.timeout == 300
    assert p.racks == {"hv1": "r1", "hv2": "r1", "hv3": "r2"}


def test_vm_overrides_tier_and_readiness() -> None:
    p = policy('[ha]\nready_delay = "5s"\n')
    assert p.vms["db1"].ready.delay == 5
    cfg = BASE.replace('[vm.batch]\nhost = "hv3"', '[vm.batch]\nhost = "hv3"\nha = true\n'
                       'ready_check = "tcp:5432"\nready_delay = "20s"')
    cfg = cfg.replace('[vm.db1]\nhost = "hv1"\ntier = "gold"', '[vm.db1]\nhost = "hv1"\n'
                      'tier = "gold"\nha = false')
    inv = inventory.from_config(config.parse(tomllib.loads(cfg), PATH))
    p = load_policy(inv)
    assert "db1" not in p.vms and p.vms["batch"].ready.check == "tcp:5432"
    assert p.vms["batch"].ready.delay == 20


def test_default_timings_are_safe_and_meet_the_goal() -> None:
    s = HASettings()
    # the self-fence (plus the time to kill) ends before the restart can begin
    assert s.self_fence_after + FENCE_KILL_BUDGET <= s.lease_ttl + s.fence_delay
    assert s.lease_ttl / s.lease_renew >= 3  # three renewals per TTL
    assert s.worst_restart_after_crash + 1.0 + 0.3 <= 10  # placement + start: ≤ 10 s
    assert not must_self_fence(s, 100.0, 103.4) and must_self_fence(s, 100.0, 103.5)
    assert not restart_allowed(s, 200.0, 201.9) and restart_allowed(s, 200.0, 202.0)


@pytest.mark.parametrize(("extra", "expected"), [
    ('[ha]\nlease_ttl = "1s"\nlease_renew = "2s"\n', "ha.lease_ttl: 1s is not above "
     "lease_renew (2s)"),
    ('[ha]\nlease_ttl = "3s"\nlease_renew = "2s"\n', "ha.lease_renew: 2s leaves fewer than "
     "two renewals"),
    ('[ha]\nself_fence_margin = "4s"\n', "ha.self_fence_margin: must be above 0 and below"),
    ('[ha]\nself_fence_margin = "0.2s"\nfence_delay = "0s"\n', "ha.fence_delay: "
     "self_fence_margin + fence_delay must be at least 1s"),
    ('[ha]\nvm_monitor_interval = "30s"\nvm_hang_timeout = "40s"\n',
     "ha.vm_hang_timeout: must be at least twice vm_monitor_interval (60s)"),
    ('[ha]\nlease_ttl = "soon"\n', "ha.lease_ttl: expected a duration"),
    ('[ha]\nadmission = "maybe"\n', "ha.admission: expected one of refuse, warn"),
    ('[ha]\nhost_failures_tolerated = -1\n', "ha.host_failures_tolerated: expected an integer"),
    ('[ha]\nfence_command = "fence_ipmilan --ip={bmc}"\n',
     "ha.fence_command: unknown placeholder {bmc}"),
    ('[ha]\nready_check = "ping"\n', "ha.ready_check: expected agent, none, tcp:PORT"),
    ('[ha]\nlease = "5s"\n', "ha.lease: unknown setting"),
    ('[ha.anti_affinity]\ndb = "rack"\n', "ha.anti_affinity.db: no VM is in anti-affinity"),
    ('[ha.anti_affinity]\ndb = "row"\n', "ha.anti_affinity.db: expected one of host, rack"),
])
def test_bad_ha_table(extra: str, expected: str) -> None:
    assert error(extra).startswith(expected)


def _vm(name: str, body: str) -> str:
    return f'\n[vm.{name}]\ntier = "gold"\nvcpus = 1\nmemory = "1GiB"\n{body}\n'


def test_bad_vm_keys() -> None:
    assert error(_vm("x", 'host = "hv1"\nhosts = ["hv9"]')) == "vm.x.hosts: unknown host 'hv9'"
    assert error(_vm("x", 'host = "hv1"\nhosts_rule = "must"')) == \
        "vm.x.hosts_rule: without hosts = [...]"
    assert error(_vm("x", 'host = "hv1"\nhosts = ["hv1"]\nhosts_rule = "may"')).startswith(
        "vm.x.hosts_rule: expected one of must, should")
    assert error(_vm("x", 'host = "hv1"\nready_check = "http"')).startswith(
        "vm.x.ready_check: expected agent")
    assert error(_vm("x", 'host = "hv1"\nha = "yes"')).startswith("vm.x.ha: expected true")
    assert error(_vm("x", 'host = "hv1"\ndepends_on = ["nope"]')) == \
        "vm.x.depends_on: unknown VM 'nope'"


def test_dependency_cycle() -> None:
    msg = error(_vm("a", 'host = "hv1"\ndepends_on = ["b"]') +
                _vm("b", 'host = "hv2"\ndepends_on = ["a"]'))
    assert msg == "vm.b.depends_on: dependency cycle a → b → a"


def test_unsatisfiable_anti_affinity() -> None:
    four = "".join(_vm(f"n{i}", f'host = "hv{i % 3 + 1}"\nanti_affinity = "quorum"')
                   for i in range(4))
    assert error(four) == ("vm.n3.anti_affinity: group 'quorum' has 4 VMs (n0, n1, n2, n3) "
                           "but only 3 hosts to keep them apart")
    three = "".join(_vm(f"n{i}", f'host = "hv{i + 1}"\nanti_affinity = "quorum"')
                    for i in range(3))
    policy(three)  # three hosts: fine
    assert error(three + '[ha.anti_affinity]\nquorum = "rack"\n').endswith(
        "but only 2 racks to keep them apart")
    # must-affinity narrows it: two VMs that may only use hv1
    pinned = "".join(_vm(f"p{i}", 'host = "hv1"\nanti_affinity = "g"\nhosts = ["hv1"]')
                     for i in range(2))
    assert error(pinned).endswith("has 2 VMs (p0, p1) but only 1 host to keep them apart")


def test_cli_exit_2_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "estate.toml"
    cfg.write_text(BASE + '[ha]\nlease_ttl = "1s"\nlease_renew = "2s"\n')
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg), "ha",
                        "validate"], capture_output=True, text=True, check=False)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith(f"vmdr: error: {cfg}: ha.lease_ttl: 1s is not above")
