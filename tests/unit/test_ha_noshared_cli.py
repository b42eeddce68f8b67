"""``vmdr ha simulate`` for VMs without shared storage, through the real CLI and a real
repository: the restore point each would start from and the data lost, or why it cannot
(one line each; ``restores`` in --json; exit 1 without a restore point)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.unit.repofixtures import PASS, make_repo
from tests.unit.test_ha_policy import BASE
from tests.unit.test_plan_estates import write_snapshot
from vmdr.timeutil import utcnow


def vmdr(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--config", str(cfg), "ha",
                        *args], capture_output=True, text=True, check=False)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def estate(tmp: Path, *, backup_of: tuple[str, ...]) -> tuple[Path, str]:
    pw = tmp / "pw"
    pw.write_text(PASS + "\n")
    pw.chmod(0o600)
    repo = make_repo(str(tmp / "repo"))
    sid = ""
    for vm in backup_of:
        sid = write_snapshot(repo, vm, utcnow() - timedelta(minutes=5), 1 << 20)
    repo.close()
    cfg = tmp / "estate.toml"
    text = BASE.replace('depends_on = ["db1"]\n', 'depends_on = ["db1"]\nha_storage = "local"\n'
                        'ha_repository = "dr"\n')
    cfg.write_text(text + f'[repositories.dr]\nurl = "{tmp / "repo"}"\n'
                          f'password_file = "{pw}"\nlocation = "b1"\n')
    return cfg, sid


def test_simulate_names_the_backup_and_the_loss(tmp_path: Path) -> None:
    cfg, sid = estate(tmp_path, backup_of=("app1",))
    p = vmdr(cfg, "simulate", "--fail", "hv2", "--json")
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(p.stdout)["restores"]
    assert row["vm"] == "app1" and row["restore"] == "snapshot" and row["to"] in ("hv1", "hv3")
    assert row["point"]["id"] == sid and row["point"]["where"] == "dr"
    assert 299 <= row["lost_s"] < 330
    assert row["reason"].startswith(f"snapshot {sid[:8]} of ")
    assert "(instant restore; lost ≤ 5 min " in row["reason"]
    text = vmdr(cfg, "simulate", "--fail", "hv2").stdout
    line = next(ln for ln in text.splitlines() if "app1: local disks" in ln)
    assert f"restarts on {row['to']} from snapshot {sid[:8]} of " in line
    assert line.endswith("of writes) if its host failed now")
    # a failure without a local VM says nothing of restores
    assert json.loads(vmdr(cfg, "simulate", "--fail", "hv1", "--json").stdout)["restores"] \
        == []


def test_simulate_without_a_restore_point_says_so_and_exits_1(tmp_path: Path) -> None:
    cfg, _ = estate(tmp_path, backup_of=("db1",))
    p = vmdr(cfg, "simulate", "--fail", "hv2", "--json")
    assert p.returncode == 1
    (row,) = json.loads(p.stdout)["restores"]
    assert row["point"] is None and row["restore"] is None
    assert row["reason"] == "no restore point: no backup of app1 in repository dr"
    p = vmdr(cfg, "simulate", "--fail", "hv2")
    assert p.returncode == 1
    assert ("app1: local disks, cannot restart: no restore point: no backup of app1 in "
            "repository dr") in p.stdout
    # an unreadable repository is a reason too, not a traceback
    (tmp_path / "pw").write_text("wrong\n")
    row = json.loads(vmdr(cfg, "simulate", "--fail", "hv2", "--json").stdout)["restores"][0]
    assert row["point"] is None and row["reason"].startswith("no restore point: repository dr: ")


def test_status_rows_carry_the_restore_point(tmp_path: Path) -> None:
    from vmdr import config
    from vmdr.agent.ha_restore import preview_line
    from vmdr.cli.ha_engine_cmds import _restores
    from vmdr.ha.model import load_policy
    from vmdr.plan import inventory

    cfg_path, sid = estate(tmp_path, backup_of=("app1",))
    cfg = config.load(str(cfg_path))
    inv = inventory.from_config(cfg)
    d: dict[str, Any] = {"vms": [{"vm": "app1", "would_go_to": "hv3"},
                                 {"vm": "db1", "would_go_to": "hv2"}]}
    _restores(cfg, inv, load_policy(inv), d)
    app, db = d["vms"]
    assert "restore" not in db  # shared storage: nothing to say
    assert app["restore"]["point"]["id"] == sid and app["restore"]["to"] == "hv3"
    assert preview_line(app["restore"]).startswith(
        f"  app1: local disks, restarts on hv3 from snapshot {sid[:8]} of ")


def test_bad_ha_keys_are_one_line_errors_exit_2(tmp_path: Path) -> None:
    cfg, _ = estate(tmp_path, backup_of=())
    text = cfg.read_text()
    cfg.write_text(text.replace('ha_repository = "dr"', 'ha_repository = "nas"'))
    p = vmdr(cfg, "validate")
    assert p.returncode == 2
    assert p.stderr.strip() == (f"vmdr: error: {cfg}: vm.app1.ha_repository: unknown "
                                "repository 'nas' (known: dr)")
    cfg.write_text(text.replace('ha_storage = "local"', 'ha_storage = "nfs"'))
    p = vmdr(cfg, "simulate", "--fail", "hv2")
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "vm.app1.ha_storage" in p.stderr and "shared, local" in p.stderr
