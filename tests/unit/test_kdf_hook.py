"""Tests make cheap key slots without any switch in vmdr: in-process and in the vmdr
processes they start (tests/kdfhook), while vmdr itself keeps the strong default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vmdr.repository import keys

from .test_cli import run

PRINT_DEFAULT = "from vmdr.repository.keys import default_kdf; print(default_kdf().memory_kib)"


def test_cli_processes_of_the_suite_use_cheap_slots(tmp_path: Path) -> None:
    assert keys.default_kdf() == keys.KdfParams.for_tests()
    run("repo", "init", env={"VMDR_REPO": str(tmp_path / "r"), "VMDR_PASSWORD": "pw"})
    (slot,) = (tmp_path / "r" / "keys").iterdir()
    assert json.loads(slot.read_text())["kdf"]["memory_kib"] == 1024


def test_vmdr_outside_the_suite_keeps_the_strong_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PRINT_DEFAULT], env=env, text=True,
                         capture_output=True, check=True).stdout
    assert int(out) == keys.KdfParams().memory_kib == 65536
