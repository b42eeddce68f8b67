"""Tests make cheap key slots without any switch in vmdr: in-process and in the vmdr
processes they start (tests/kdfhook; test_passphrase_tty checks a CLI-made slot), while
vmdr itself keeps the strong default."""

from __future__ import annotations

import os
import subprocess
import sys

from vmdr.repository import keys

PRINT_DEFAULT = "from vmdr.repository.keys import default_kdf; print(default_kdf().memory_kib)"


def test_vmdr_outside_the_suite_keeps_the_strong_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PRINT_DEFAULT], env=env, text=True,
                         capture_output=True, check=True).stdout
    assert int(out) == keys.KdfParams().memory_kib == 65536
    assert keys.default_kdf() == keys.KdfParams.for_tests()  # in the suite
