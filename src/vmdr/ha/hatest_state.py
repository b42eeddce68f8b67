"""Crash safety of ``vmdr ha test``: its state file, and undoing what a killed run left.

Before production's disks are frozen, ``vmdr ha test VM`` writes
``<disk dir>/<VM>.hatest.vmdr-state.json`` (mode 0600, next to the overlays on the shared
storage, so any machine that can run the test finds it): who runs the test (host, pid),
where production and the copy run, the copy's name and production's own images. A run
that ends, passed or failed, removes it after production is back on its own images.

If vmdr is killed meanwhile (``kill -9``, a crash, a reboot of the operator's machine),
production keeps writing to the temporary overlay ``<VM>-<disk>.hatest.vmdr-overlay.qcow2``.
:func:`recover` undoes that: it destroys (and undefines) the throw-away copy on the
failover host and deletes its files, merges production's overlay back (active blockcommit
+ pivot; ``qemu-img commit`` if the VM was stopped since) and points its definition back
at its own images. It runs at the start of every ``vmdr ha test VM`` and alone with
``vmdr ha test VM --recover``. A leftover overlay is found from the domain's XML even
without the state file.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmdr.errors import DomainNotFound, HypervisorError, UsageError, VMLocked
from vmdr.timeutil import utcnow

from .fleet import Connect

__all__ = ["STATE_SUFFIX", "TestState", "owner_alive", "read_state", "recover",
           "remove_state", "state_path", "write_state"]

STATE_SUFFIX = ".hatest.vmdr-state.json"
HATEST_MARK = ".hatest.vmdr-overlay.qcow2"  # = vmdr.hypervisor.overlay.HATEST_MARK
GRACE = 600.0  # a run on another machine is presumed alive until its timeout + this


@dataclass
class TestState:
    vm: str
    source: str  # inventory host running production
    target: str  # inventory host of the copy
    copy: str  # the copy's domain name (vmdr-hatest-VM-STAMP)
    workdir: str  # the disk directory: overlays, the copy's files, this file
    originals: dict[str, tuple[str, str]] = field(default_factory=dict)  # disk -> (path, fmt)
    host: str = ""  # the machine running vmdr ha test
    pid: int = 0
    started: float = 0.0  # epoch s
    until: float = 0.0  # epoch s: presumed alive until then when the owner cannot be asked

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["originals"] = {t: list(v) for t, v in self.originals.items()}
        return {"version": 1, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TestState:
        return cls(str(d["vm"]), str(d["source"]), str(d["target"]), str(d["copy"]),
                   str(d["workdir"]),
                   {str(t): (str(v[0]), str(v[1])) for t, v in d.get("originals", {}).items()},
                   str(d.get("host", "")), int(d.get("pid", 0)),
                   float(d.get("started", 0.0)), float(d.get("until", 0.0)))


def state_path(workdir: str, vm: str) -> str:
    return os.path.join(workdir, f"{vm}{STATE_SUFFIX}")


def write_state(st: TestState) -> str:
    """Write the state file atomically, mode 0600; its path."""
    path = state_path(st.workdir, st.vm)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(st.to_json(), indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise HypervisorError(f"cannot write the failover-test state file {path}: "
                              f"{exc.strerror}; nothing was frozen") from exc
    return path


def read_state(workdir: str, vm: str) -> TestState | None:
    path = state_path(workdir, vm)
    try:
        with open(path, encoding="utf-8") as f:
            return TestState.from_json(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(f"{path}: unreadable failover-test state ({exc}); check the VM's "
                         "disks by hand (virsh domblklist) and remove the file") from exc


def remove_state(workdir: str, vm: str) -> None:
    try:
        os.unlink(state_path(workdir, vm))
    except FileNotFoundError:
        pass


def owner_alive(st: TestState, *, me: str | None = None,
                now: Callable[[], datetime] = utcnow) -> bool:
    """Is the run that wrote ``st`` still going? On this machine: its pid is a live vmdr.
    On another: presumed alive until ``st.until`` (its timeout and a grace period)."""
    if st.host != (me or os.uname().nodename):
        return now().timestamp() < st.until
    try:
        with open(f"/proc/{st.pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return st.pid != os.getpid() and b"vmdr" in cmd


def recover(connect: Connect, vm: str, source: str, workdir: str, *,
            alive: Callable[[TestState], bool] = owner_alive) -> list[str]:
    """Undo what an interrupted ``vmdr ha test`` of ``vm`` left (module docstring); what
    was done, empty when nothing was left. VMLocked (exit 13) while that run still goes.
    ``source``: the host running ``vm`` now (used when there is no state file)."""
    st = read_state(workdir, vm)
    if st is not None and alive(st):
        raise VMLocked(f"a failover test of {vm} is running (pid {st.pid} on {st.host}, "
                       f"since {_hms(st.started)}); "
                       f"if it is dead, wait until "
                       f"{_hms(st.until)} or run "
                       f"vmdr ha test {vm} --recover on {st.host}")
    done: list[str] = []
    copy_gone = True
    if st is not None:
        copy_gone, what = _destroy_copy(connect, st)
        done += what
    hv = connect(source)
    try:
        done += hv.lookup(vm).merge_frozen(workdir, st.originals if st else None)
    finally:
        hv.close()
    if st is None:
        return done
    if not copy_gone:
        raise HypervisorError(f"{vm}: production is back on its own images, but the "
                              f"throw-away copy {st.copy} on {st.target} could not be "
                              f"checked; run vmdr ha test {vm} --recover again")
    # production is on its own images now: an overlay whose merge had pivoted before the
    # kill but was not deleted yet goes too (the driver's names, exact per disk)
    mine = [os.path.join(st.workdir, f"{vm}-{t}{HATEST_MARK}") for t in st.originals]
    for p in [*sorted(glob.glob(os.path.join(glob.escape(st.workdir), f"{st.copy}-*"))),
              *[m for m in mine if os.path.exists(m)]]:
        try:
            os.unlink(p)
            done.append(f"deleted {p}")
        except FileNotFoundError:
            pass
    remove_state(workdir, vm)
    return done


def _hms(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S UTC")


def _destroy_copy(connect: Connect, st: TestState) -> tuple[bool, list[str]]:
    """(the copy is gone, what was done)."""
    try:
        hv = connect(st.target)
    except HypervisorError:
        return False, []
    try:
        try:
            copy = hv.lookup(st.copy)
        except DomainNotFound:
            return True, []
        copy.destroy()
        try:
            copy.undefine()
        except HypervisorError:
            pass  # transient: gone with destroy
        return True, [f"destroyed the throw-away copy {st.copy} on {st.target}"]
    except HypervisorError:
        return False, []
    finally:
        hv.close()
