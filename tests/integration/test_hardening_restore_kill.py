"""Issue 14, item 5: ``kill -9`` of a real ``vmdr image restore`` never leaves a partial
image under the final name, in any format, and ``--force`` keeps the old file until the
new one is complete. (Real CLI subprocess, real qemu-img/qemu-nbd for qcow2 and vmdk.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.hardening_helpers import cli_env
from tests.unit.repofixtures import make_repo
from vmdr.jobs.image import backup_image

VMDR = [sys.executable, "-m", "vmdr.cli.main"]
SIZE = 48 << 20


Big = tuple[dict[str, str], bytes]  # the fixture `big`: environment, image data


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Big:
    """A repository holding one 48 MiB image of incompressible data, in 64 KiB chunks
    (many chunks: a restore takes long enough to be killed in the middle)."""
    tmp = tmp_path_factory.mktemp("killrestore")
    env = cli_env(tmp)
    env["VMDR_CACHE_DIR"] = str(tmp / "cache")
    data = random.Random(7).randbytes(SIZE)
    src = tmp / "src.raw"
    src.write_bytes(data)
    old = os.environ.get("VMDR_CACHE_DIR")
    os.environ["VMDR_CACHE_DIR"] = env["VMDR_CACHE_DIR"]
    try:
        with make_repo(env["VMDR_REPO"]) as r:
            backup_image(r, str(src), "big")
    finally:
        if old is not None:
            os.environ["VMDR_CACHE_DIR"] = old
    src.unlink()
    return env, data


def _kill_mid_restore(env: dict[str, str], out: Path, fmt: str, force: bool) -> None:
    """Start the restore; as soon as its temporary file has data, kill -9 it. Retried
    (with a fresh process) if a run finishes before it could be caught."""
    for _ in range(5):
        args = [*VMDR, "image", "restore", "big", str(out), "--format", fmt, "--no-progress"]
        p = subprocess.Popen(args + (["--force"] if force else []),
                             env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        killed = False
        while time.monotonic() < deadline and p.poll() is None:
            # the file being written: a temporary one, or (the bug) the target itself
            growing = [e for e in os.scandir(out.parent)
                       if e.name.startswith(f".{out.name}.") or (e.name == out.name
                                                                  and not force)]
            if growing and growing[0].stat().st_blocks * 512 > (2 << 20):
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        p.wait(30)
        assert p.stderr is not None
        p.stderr.close()
        if killed:
            assert p.returncode == -signal.SIGKILL
            return
        assert p.returncode == 0
        if not force:
            out.unlink()
    pytest.fail("the restore always finished before it could be killed")


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_kill9_leaves_no_partial_image(tmp_path: Path, big: Big, fmt: str) -> None:
    env, _ = big
    out = tmp_path / f"out.{fmt}"
    _kill_mid_restore(env, out, fmt, force=False)
    assert not out.exists(), "a partial image sits under the final name"
    # the leftover is hidden and named as partial; a new restore is not confused by it
    left = [n for n in os.listdir(tmp_path) if n.endswith(".vmdr-partial")]
    assert left and all(n.startswith(".") for n in left)


def test_kill9_with_force_keeps_the_old_file(tmp_path: Path, big: Big) -> None:
    env, data = big
    out = tmp_path / "out.raw"
    old = b"the previous restore, complete and good\n" * 1000
    out.write_bytes(old)
    _kill_mid_restore(env, out, "raw", force=True)
    assert out.read_bytes() == old
    # and a complete restore does replace it, with the right content
    subprocess.run([*VMDR, "image", "restore", "big", str(out), "--force", "--no-progress"],
                   env={**os.environ, **env}, check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == data
    assert (out.stat().st_mode & 0o777) == 0o600
