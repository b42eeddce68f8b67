"""Self-fencing without libvirt: kill the QEMU of an HA VM by libvirt's pid file.

Self-fencing normally destroys the host's HA VMs through libvirt. If libvirtd is dead
*and* the host loses its lease, libvirt cannot list or destroy anything, yet the QEMU
processes run on — and the leader restarts those VMs elsewhere after the fence delay.
The last resort is the pid file libvirt's QEMU driver keeps for each running domain
(``/run/libvirt/qemu/<name>.pid`` for ``qemu:///system``): a process is killed only if
its command line carries ``-name guest=<name>`` (libvirt always passes it), so a reused
pid or a stale file never kills anything else. Processes are never looked up by name in
``/proc``: on a machine running several libvirt hosts (tests, nested setups) a guest of
the same name may belong to another host.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SYSTEM_RUN_DIR", "kill_by_pidfile", "qemu_pid"]

SYSTEM_RUN_DIR = "/run/libvirt/qemu"


def _is_guest(argv: list[bytes], vm: str) -> bool:
    want = f"guest={vm}".encode()
    return any(a == b"-name" and i + 1 < len(argv) and
               (argv[i + 1] == want or argv[i + 1].startswith(want + b","))
               for i, a in enumerate(argv))


def qemu_pid(vm: str, run_dir: str = SYSTEM_RUN_DIR) -> int | None:
    """The pid of *vm*'s QEMU from libvirt's pid file, if that process is it."""
    try:
        pid = int(Path(run_dir, f"{vm}.pid").read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if _is_guest(argv, vm) else None


def kill_by_pidfile(vms: Iterable[str], run_dir: str = SYSTEM_RUN_DIR) -> list[str]:
    """SIGKILL the QEMU of each VM in *vms* found through its pid file; the VMs killed."""
    killed = []
    for vm in sorted(set(vms)):
        pid = qemu_pid(vm, run_dir)
        if pid is None:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(vm)
    return killed
