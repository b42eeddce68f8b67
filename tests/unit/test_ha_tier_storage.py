"""``ha_storage`` / ``ha_repository`` per tier, like ``ha = true``: the tier's value is
the default of its VMs, a VM's own key wins; bad values name the tier's key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.unit.test_ha_policy import BASE, PATH
from vmdr import config
from vmdr.errors import ConfigError
from vmdr.ha.model import load_policy
from vmdr.plan import inventory

TIER = '[plan.tiers.gold]\nha = true\nha_storage = "local"\nha_repository = "dr"\n'
REPO = '[repositories.dr]\nurl = "/srv/vmdr-dr"\nlocation = "b1"\n'


def estate(tier: str = TIER, extra: str = "") -> str:
    return BASE.replace("[plan.tiers.gold]\nha = true\n", tier) + extra + REPO


def test_tier_sets_the_default_and_a_vm_overrides_it() -> None:
    text = estate(extra='[vm.web]\nhost = "hv3"\ntier = "gold"\nha_storage = "shared"\n'
                        '[vm.api]\nhost = "hv3"\ntier = "gold"\nha_repository = "other"\n')
    inv = inventory.from_config(config.parse(tomllib.loads(text), PATH))
    assert inv.tiers["gold"].ha_storage == "local"
    p = load_policy(inv).vms
    assert (p["db1"].storage, p["db1"].repository) == ("local", "dr")
    assert (p["app1"].storage, p["app1"].repository) == ("local", "dr")
    assert (p["web"].storage, p["web"].repository) == ("shared", "dr")
    assert (p["api"].storage, p["api"].repository) == ("local", "other")
    assert "batch" not in p  # no tier: not under HA, and shared
    assert inv.vms["batch"].ha_storage == "shared"


def test_tier_without_the_keys_keeps_shared() -> None:
    inv = inventory.from_config(config.parse(tomllib.loads(estate("[plan.tiers.gold]\n"
                                                                  "ha = true\n")), PATH))
    assert {r.storage for r in load_policy(inv).vms.values()} == {"shared"}
    assert inv.tiers["gold"].ha_storage is None


def test_bad_tier_value_names_the_tier_key() -> None:
    with pytest.raises(ConfigError) as ei:
        inventory.from_config(config.parse(tomllib.loads(estate(
            TIER.replace('"local"', '"nfs"'))), PATH))
    assert "plan.tiers.gold.ha_storage: expected one of shared, local" in ei.value.message


def test_unknown_tier_repository_exit_2_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "estate.toml"
    cfg.write_text(estate(TIER.replace('"dr"', '"nope"')))
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg), "ha",
                        "validate"], capture_output=True, text=True, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.splitlines() == [
        f"vmdr: error: {cfg}: plan.tiers.gold.ha_repository: unknown repository 'nope' "
        "(known: dr)"], p.stderr
