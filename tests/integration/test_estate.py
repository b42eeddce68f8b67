"""The test estate itself: the guest boots from its own disk, heartbeats, answers the guest
agent, freezes/thaws, runs its writer, and a crash copy of its data disk is consistent."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import layout as L
from tests.guest.estate import TestVM, cleanup_stale, ensure_built
from tests.guest.initramfs import MissingInput
from tests.guest.records import check_records

pytestmark = pytest.mark.vm

WRITER_RATE = 100  # via fw_cfg, to exercise the override of the built-in default


@pytest.fixture(scope="module")
def estate_ready() -> None:
    """Skip unless libvirtd answers and the images can be built; drop stale test domains."""
    try:
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.open("qemu:///system").close()
    except Exception as e:  # no python3-libvirt, or no libvirtd
        pytest.skip(f"libvirt not available: {e}")
    try:
        ensure_built()
    except MissingInput as e:
        pytest.skip(str(e))
    cleanup_stale()


@pytest.fixture(scope="module")
def vm(estate_ready: None) -> Iterator[TestVM]:
    """One guest shared by the tests below (the crash test destroys it, so it runs last)."""
    with TestVM(writer_rate=WRITER_RATE) as vm:
        yield vm


def test_boots_from_own_disk_and_heartbeats(vm: TestVM) -> None:
    elapsed = vm.wait_heartbeat(90, count=2)
    xml = vm.dom.XMLDesc(0)
    assert "<kernel>" not in xml and "<initrd>" not in xml  # boots via its own MBR/syslinux
    booted = vm.wait_for(rf"{L.BOOTED_MARKER} .*", 1).group(0)
    assert "data=/dev/vdb1" in booted and "records=/dev/vdb2" in booted, booted
    assert f"rate={WRITER_RATE}" in booted, booted
    beats = vm.heartbeats()
    assert [n for n, _ in beats] == list(range(1, len(beats) + 1))
    print(f"start-to-heartbeat-2: {elapsed:.1f}s")


def test_guest_agent(vm: TestVM) -> None:
    vm.wait_heartbeat(90)
    vm.agent_ping(30)
    path = f"/data/{L.HELLO_PATH}"
    handle = vm.agent_command({"execute": "guest-file-open", "arguments": {"path": path}})
    try:
        got = vm.agent_command(
            {"execute": "guest-file-read", "arguments": {"handle": handle, "count": 4096}}
        )
    finally:
        vm.agent_command({"execute": "guest-file-close", "arguments": {"handle": handle}})
    assert base64.b64decode(got["buf-b64"]).decode() == L.HELLO_TEXT


def test_fsfreeze_thaw(vm: TestVM) -> None:
    vm.agent_ping(30)
    frozen = vm.dom.fsFreeze()
    try:
        assert frozen >= 1
        assert vm.agent_command({"execute": "guest-fsfreeze-status"}) == "frozen"
        count = vm.heartbeats()[-1][0]
        vm.wait_heartbeat(10, count=count + 1)  # the guest keeps running while frozen
    finally:
        thawed = vm.dom.fsThaw()
    assert thawed == frozen
    assert vm.agent_command({"execute": "guest-fsfreeze-status"}) == "thawed"


def test_writer_and_crash_copy_is_consistent(vm: TestVM, tmp_path: Path) -> None:
    first = int(vm.wait_for(rf"{L.WRITER_MARKER} seq=(\d+)", 60).group(1))
    pos = vm.console_text().rfind(f"{L.WRITER_MARKER} seq={first}")
    second = int(vm.wait_for(rf"{L.WRITER_MARKER} seq=(\d+)", 20, after=pos + 1).group(1))
    assert second > first
    vm.stop()  # virsh destroy: a crash
    assert vm.data_disk is not None
    copy = tmp_path / "data-crash.qcow2"
    shutil.copyfile(vm.data_disk, copy)
    result = check_records(copy, "qcow2")
    assert result.consistent, result.problems
    assert result.last_seq >= second
    assert result.count == result.last_seq + 1  # no wrap-around yet: all records present


def test_zeroed_boot_disk_does_not_boot(estate_ready: None) -> None:
    with TestVM(start=False, agent=False) as bad:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -z 0 1M", str(bad.boot_disk)],
            check=True,
            capture_output=True,
        )
        bad.start()
        # SeaBIOS (serial console enabled in the domain XML) gives up on vda, then retries
        # every 60 s; a good disk prints its first heartbeat ~7-10 s after start.
        bad.wait_for(r"No bootable device", 30)
        time.sleep(2)
        assert "Booting from Hard Disk" in bad.console_text()
        assert bad.heartbeats() == []
        assert L.BOOTED_MARKER not in bad.console_text()
