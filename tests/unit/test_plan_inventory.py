"""Inventory parsing and validation: every bad inventory gives one clear error naming the
file, the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdr import config
from vmdr.errors import ConfigError
from vmdr.plan import inventory, taxonomy
from vmdr.plan.units import fmt_duration, parse_duration, parse_rate, parse_size

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "estate.toml"

BASE = """
[locations.b1]
kind = "building"
name = "B1"
[locations.r1]
kind = "rack"
parent = "b1"
[hosts.hv1]
location = "r1"
vcpus = 8
memory = "32GiB"
[repositories.local]
url = "/srv/vmdr"
location = "b1"
[vm.web01]
host = "hv1"
"""


def load(tmp_path: Path, text: str) -> inventory.Inventory:
    p = tmp_path / "estate.toml"
    p.write_text(text)
    return inventory.from_config(config.load(str(p)))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        inv = load(tmp_path, text)
        inventory.check_placed(inv)
    msg = ei.value.message
    assert msg.startswith(str(tmp_path / "estate.toml") + ": "), msg
    assert "\n" not in msg
    return msg.split(": ", 1)[1]


def test_base_parses(tmp_path: Path) -> None:
    inv = load(tmp_path, BASE)
    assert inv.hosts["hv1"].memory == 32 << 30
    assert inv.unit("r1", "building") == "b1"
    assert inv.unit("r1", "city") == "b1"  # a building on no declared campus/city
    assert inv.unit("b1", "rack") is None
    assert inv.required_levels(inv.vms["web01"]) == ()
    assert inv.repositories["local"].media == "disk"


def test_unknown_location(tmp_path: Path) -> None:
    msg = error(tmp_path, BASE.replace('location = "r1"', 'location = "rack-z9"'))
    assert msg == "hosts.hv1.location: unknown location 'rack-z9'"


def test_unknown_parent_and_wrong_order(tmp_path: Path) -> None:
    assert error(tmp_path, BASE.replace('parent = "b1"', 'parent = "nowhere"')) == \
        "locations.r1.parent: unknown location 'nowhere'"
    msg = error(tmp_path, BASE.replace('kind = "rack"', 'kind = "country"'))
    assert msg.startswith("locations.r1.parent: a country cannot be inside a building")


def test_dependency_cycle(tmp_path: Path) -> None:
    text = BASE + """depends_on = ["app01"]
[vm.app01]
host = "hv1"
depends_on = ["db01"]
[vm.db01]
host = "hv1"
depends_on = ["web01"]
"""
    msg = error(tmp_path, text)
    assert msg.startswith("vm.")
    assert "depends_on: dependency cycle" in msg
    assert "app01 → db01 → web01 → app01" in msg


def test_self_dependency_and_unknown_dependency(tmp_path: Path) -> None:
    assert "dependency cycle web01 → web01" in error(tmp_path, BASE + 'depends_on = ["web01"]\n')
    assert error(tmp_path, BASE + 'depends_on = ["nope"]\n') == \
        "vm.web01.depends_on: unknown VM 'nope'"


def test_vm_in_no_location(tmp_path: Path) -> None:
    msg = error(tmp_path, BASE + '[vm.orphan]\nowner = "x"\n')
    assert msg.startswith('vm.orphan: in no location: set host = "<host>" (one of hv1)')


def test_other_errors(tmp_path: Path) -> None:
    assert error(tmp_path, BASE + 'tier = "gold"\n').startswith(
        "vm.web01.tier: unknown tier 'gold'")
    assert error(tmp_path, BASE + 'rpo = "soon"\n').startswith(
        "vm.web01.rpo: expected a duration")
    assert error(tmp_path, BASE + 'must_survive = ["meteor"]\n').startswith(
        "vm.web01.must_survive: unknown disaster level 'meteor'")
    assert error(tmp_path, BASE + 'host = "hv9"\n'.replace("host", "boot_group").replace(
        '"hv9"', '"x"')).startswith("vm.web01.boot_group: expected an integer")
    assert error(tmp_path, BASE.replace('memory = "32GiB"', "memory = 32")).startswith(
        "hosts.hv1.memory: expected a size")
    assert error(tmp_path, BASE.replace('url = "/srv/vmdr"', 'immutable = true')) == \
        "repositories.local.url: missing (required)"
    assert error(tmp_path, BASE.replace('location = "b1"', 'location = "b1"\nmedia = "floppy"')
                 ).startswith(
        "repositories.local.media: expected one of disk, object, tape, got 'floppy'")
    assert error(tmp_path, BASE.replace('name = "B1"', 'colour = "red"')) == \
        "locations.b1.colour: unknown setting"
    assert error(tmp_path, BASE.replace('location = "b1"', 'vault = "v"')) == \
        "repositories.local.vault: unknown vault 'v'"
    assert error(tmp_path, BASE.replace('location = "b1"', 'media = "disk"')) == \
        "repositories.local.location: missing: give location, host or vault"


def test_boot_group_contradicts_dependency(tmp_path: Path) -> None:
    text = BASE + 'boot_group = 1\ndepends_on = ["db01"]\n[vm.db01]\nhost = "hv1"\nboot_group = 2\n'
    assert error(tmp_path, text) == \
        "vm.web01.depends_on: db01 is in boot group 2, after web01's boot group 1"


def test_unknown_vm_key_is_a_warning(tmp_path: Path) -> None:
    inv = load(tmp_path, BASE + 'dependson = ["x"]\nconsistency = "crash"\n')
    assert len(inv.warnings) == 1 and "vm.web01.dependson: not a plan setting" in inv.warnings[0]


def test_example_estate() -> None:
    inv = inventory.from_config(config.load(str(EXAMPLE)))
    inventory.check_placed(inv)
    assert len(inv.hosts) == 4 and len(inv.vms) == 6 and len(inv.repositories) >= 3
    countries = {inv.unit(h.location, "country") for h in inv.hosts.values()}
    buildings = {inv.unit(h.location, "building") for h in inv.hosts.values()}
    assert len(countries) == 2 and len(buildings) == 3
    assert any(r.url.startswith("s3://") for r in inv.repositories.values())
    assert any(r.immutable for r in inv.repositories.values()) and inv.vaults
    assert inventory.boot_order(inv) == ["db01", "dns01", "app01", "mail01", "web01", "web02"]
    db, web = inv.restorer("db01"), inv.restorer("web01")
    assert db is not None and db.key == "dba"
    assert web is not None and web.key == "platform"
    assert not inv.warnings


def test_units() -> None:
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("90s") == 90 and parse_duration("2w") == 14 * 86400
    assert parse_duration("4x") is None and parse_duration("") is None
    assert parse_size("64GiB") == 64 << 30 and parse_size("512M") == 512 << 20
    assert parse_rate("200MiB/s") == 200 * (1 << 20) and parse_rate("200MiB") is None
    assert fmt_duration(90) == "90s" and fmt_duration(7200) == "2h"
    assert fmt_duration(3 * 86400) == "3d" and fmt_duration(None) == "—"


def test_taxonomy_is_data() -> None:
    keys = taxonomy.LEVEL_KEYS
    assert keys[0] == "application" and keys[-1] == "multinational" and len(keys) == 12
    for lv in taxonomy.LEVELS:
        assert lv.recovery and lv.activation
        assert lv.scope in ("vm", "host", "fabric") or lv.scope in taxonomy.KIND_RANK
