"""The real ``mtx``/``mt`` and SG_IO back ends against tgt's emulated tape library on
127.0.0.1, through the LD_PRELOAD library built here (tests/tape/).

What this tier is: real user-space tools and real SCSI commands (SMC and SSC) against an
emulated library — not the kernel st driver and not hardware. The contract suite
(tests/tape/contract.py) runs in a child pytest per back end, because LD_PRELOAD must be
set when the process starts; then one tape backup, catalog rebuild and restore runs
through the ``vmdr`` command with the mtx back end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tape.tgt import TgtLibrary, tools_missing

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(bool(tools_missing()),
                                reason=f"tape tools missing: {', '.join(tools_missing())}")
TAPES = ["VMD001L8", "VMD002L8", "VMD003L8", "CLN001L1"]


@pytest.fixture(scope="module")
def tgt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TgtLibrary]:
    """Its own tgtd (private ports). Heavy: run under ``flock /tmp/vmdr-heavy.lock``, as
    the whole suite is (a lock taken here would deadlock under that wrapper)."""
    lib = TgtLibrary(tmp_path_factory.mktemp("tgt"), TAPES, tape_mb=64)
    lib.start()
    try:
        yield lib
    finally:
        lib.stop()


def _contract(tgt: TgtLibrary, kind: str) -> str:
    spec = f"{kind}:{tgt.changer_dev},{tgt.drive_dev}"
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsx",
         str(ROOT / "tests/tape/contract.py")],
        env={**tgt.env(), "VMDR_TAPE_CONTRACT": spec}, cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    return p.stdout


@pytest.mark.parametrize("kind", ["mtx", "sg"])
def test_contract_suite_against_tgt(tgt: TgtLibrary, kind: str) -> None:
    out = _contract(tgt, kind)
    assert "10 passed" in out, out[-3000:]


def test_mtx_status_output_parses(tgt: TgtLibrary) -> None:
    from vmdr.tape.mtx import parse_mtx_status

    p = subprocess.run(["mtx", "-f", str(tgt.changer_dev), "status"], env=tgt.env(),
                       capture_output=True, text=True, timeout=60, check=True)
    st = parse_mtx_status(p.stdout)
    assert [s.barcode for s in st.slots if s.full] == TAPES


def test_backup_rebuild_restore_with_real_mtx_and_mt(tgt: TgtLibrary, tmp_path: Path) -> None:
    from tests.unit.repofixtures import make_image

    env = {**tgt.env(), "VMDR_PASSWORD": "tape test", "VMDR_REPO": str(tmp_path / "repo"),
           "VMDR_TAPE_DIR": str(tmp_path / "catalog"),
           "VMDR_TAPE_LIBRARY": f"mtx:{tgt.changer_dev},{tgt.drive_dev}"}

    def vmdr(*args: str, code: int = 0) -> str:
        p = subprocess.run([sys.executable, "-m", "vmdr.cli.main", "--no-progress", *args],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
        assert p.returncode == code, f"vmdr {' '.join(args)}: {p.stdout}{p.stderr}"
        return p.stdout + p.stderr

    content = make_image(str(tmp_path / "disk.img"), 6 << 20, seed=7, pieces=40)
    vmdr("repo", "init")
    vmdr("image", "backup", str(tmp_path / "disk.img"), "--name", "web")
    vmdr("tape", "pool", "add", "offsite", "--vault", "bunker")
    vmdr("tape", "label", "--pool", "offsite", "--slot", "1", "--slot", "2", "--force")
    vmdr("tape", "backup", "--pool", "offsite", "web")
    key = tmp_path / "key"
    vmdr("key", "export", str(key))
    # the disaster: repository and catalog gone; the tapes and the key file remain
    subprocess.run(["rm", "-rf", str(tmp_path / "repo"), str(tmp_path / "catalog")], check=True)
    out = vmdr("tape", "catalog", "--rebuild", "--key-file", str(key))
    assert "VMD001L8" in out and "1 snapshots" in out
    vmdr("tape", "restore", "web", "--to", str(tmp_path / "back"), "--key-file", str(key))
    env["VMDR_REPO"] = str(tmp_path / "back")
    vmdr("image", "restore", "web", str(tmp_path / "out.img"), "--key-file", str(key))
    assert (tmp_path / "out.img").read_bytes() == content
    # a cleaning tape is not labelled, an empty slot is a one-line error with its code
    assert "cleaning" in vmdr("tape", "label", "--pool", "offsite", "--slot", "4", code=31)
    assert "empty" in vmdr("tape", "label", "--pool", "offsite", "--slot", "7", code=33)
    os.sync()
