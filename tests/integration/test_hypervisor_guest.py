"""vmdr.hypervisor against a booted test guest (tests/guest): guest agent quiesce and
heartbeats. One guest for the module (~10 s to boot under TCG)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

pytest.importorskip("libvirt")
pytest.importorskip("nbd")

from vmdr.hypervisor import Hypervisor, connect  # noqa: E402

PREFIX = "vmdr-9e579e57"


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        from tests.guest.estate import TestVM, ensure_built
        ensure_built()
    except Exception as exc:  # pragma: no cover - environment
        pytest.skip(f"test guest images unavailable: {exc}")
    with TestVM() as vm:
        yield vm


@pytest.fixture(scope="module")
def hv() -> Iterator[Hypervisor]:
    conn = connect("qemu:///system")
    yield conn
    conn.close()


def test_heartbeat_by_agent_and_console(guest: Any, hv: Hypervisor) -> None:
    took = hv.wait_heartbeat(guest.name, agent=True, timeout=180)
    assert took >= 0
    from tests.guest import layout

    took = hv.wait_heartbeat(guest.name, agent=False,
                             console_pattern=re.escape(layout.HEARTBEAT_MARKER),
                             console_log=str(guest.console_log), timeout=60)
    assert took >= 0


@pytest.fixture
def scratch() -> Iterator[str]:
    """Scratch space QEMU (libvirt-qemu) can reach; pytest's tmp_path is 0700 root."""
    path = Path(tempfile.mkdtemp(prefix="vmdr-it-scratch-", dir="/var/tmp"))
    os.chmod(path, 0o711)
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


def test_quiesced_backup_thaws(guest: Any, hv: Hypervisor, scratch: str) -> None:
    hv.wait_heartbeat(guest.name, agent=True, timeout=180)
    info = hv.domain(guest.name)
    with hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=scratch,
                   quiesce=True) as s:
        assert s.consistency == "quiesced", s.warnings
        assert guest.agent_command({"execute": "guest-fsfreeze-status"}) == "thawed"
        for d in s.disks:
            data = [e for e in d.extents() if e.is_data]
            assert data, f"{d.info.target} reads as empty"
            assert len(d.read(data[0].offset, min(data[0].length, 1 << 20))) > 0
        s.commit()
        first = s.checkpoint
    with hv.backup(info, checkpoint_prefix=PREFIX, scratch_dir=scratch,
                   incremental_from=first, quiesce=True) as s:
        assert s.consistency == "quiesced"
        assert all(d.incremental for d in s.disks if d.info.format == "qcow2")
    assert guest.agent_command({"execute": "guest-fsfreeze-status"}) == "thawed"
    assert hv.list_checkpoints(info, PREFIX) == [first]  # second was not committed
