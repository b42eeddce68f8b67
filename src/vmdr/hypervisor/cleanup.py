"""Find and undo what an interrupted backup left behind (vmdr crashed, killed, Ctrl-C).

Call it under the VM lock, before every backup. It only touches vmdr's own things: a
backup job whose socket or scratch files are in our scratch directory (or, when its owner
is dead, in another repository's work directory under the same parent: see
:func:`vmdr_job_workdir`), overlays named by :mod:`.overlay` in our scratch directory, and
an uncommitted checkpoint of this prefix. Jobs of other tools are refused.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
from collections.abc import Callable
from typing import Any

from vmdr.errors import HypervisorError, VMLocked

from . import checkpoints, overlay, state
from ._compat import lv, parse_xml
from .errors import is_code, libvirt_errors
from .hostfiles import HostFiles, LocalFiles
from .session import SOCKET_NAME

_SCRATCH_FILE = re.compile(r"[A-Za-z0-9_-]+\.scratch")
_VMDR_PREFIX = re.compile(r"vmdr-[0-9a-f]{4,64}")


def backup_job_active(dom: Any) -> bool:
    """True if libvirt reports an active backup job on this domain."""
    m = lv()
    with libvirt_errors("querying domain job"):
        stats = dom.jobStats(0)
    if not stats or stats.get("type", m.VIR_DOMAIN_JOB_NONE) == m.VIR_DOMAIN_JOB_NONE:
        return False
    return bool(stats.get("operation") == m.VIR_DOMAIN_JOB_OPERATION_BACKUP)


def abort_backup_job(dom: Any, *, timeout: float = 120.0, poll: float = 0.1) -> bool:
    """Abort the domain's backup job and wait until libvirt reports it gone.

    abortJob only starts cancelling the block jobs; the backup job stays visible (and a
    new backupBegin fails) until QEMU has finished. False if there was no job.
    """
    m = lv()
    try:
        dom.abortJob()
    except m.libvirtError as exc:
        if is_code(exc, "VIR_ERR_OPERATION_INVALID", "VIR_ERR_NO_DOMAIN"):
            return False
        with libvirt_errors("ending backup job"):
            raise
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not dom.isActive() or not backup_job_active(dom):
                return True
        except HypervisorError:
            return True
        if time.monotonic() > deadline:
            raise HypervisorError(f"backup job still active {timeout:.0f}s after abort")
        time.sleep(poll)


def job_uses_socket(dom: Any, socket_path: str) -> bool:
    """True if the domain's backup job exports on ``socket_path`` (False: no job)."""
    try:
        xml = dom.backupGetXMLDesc(0)
    except lv().libvirtError:
        return False
    return any(el.get("socket") == socket_path for el in parse_xml(xml).iter("server"))


def _job_paths(backup_xml: str) -> list[str]:
    el = parse_xml(backup_xml)
    paths = [s.get("socket", "") for s in el.iter("server")]
    paths += [s.get("file", "") for s in el.iter("scratch")]
    return [p for p in paths if p]


def job_is_ours(backup_xml: str, scratch_dir: str,
                realpath: Callable[[str], str] = os.path.realpath) -> bool:
    """True if a backup job's socket or scratch files live in our scratch directory."""
    root = realpath(scratch_dir) + "/"
    return any(realpath(p).startswith(root) for p in _job_paths(backup_xml))


def vmdr_job_workdir(backup_xml: str, scratch_dir: str, uuid: str,
                     realpath: Callable[[str], str] = os.path.realpath) -> str | None:
    """The work directory of a vmdr job of *another* repository on this domain, or None.

    vmdr puts a job's socket and scratch files in ``<parent>/<repo>/<uuid12>/`` where
    ``<parent>`` is the configured scratch directory (ours is ``<parent>/<our repo>``):
    a job whose files sit in a sibling ``<repo>`` directory, under this domain's UUID and
    with vmdr's file names, is vmdr's. Anything else belongs to another tool.
    """
    parent = posixpath.dirname(realpath(scratch_dir).rstrip("/"))
    uuid12 = uuid.replace("-", "")[:12]
    found = set()
    for p in _job_paths(backup_xml):
        rp = realpath(p)
        work, name = posixpath.split(rp)
        repo_dir, w = posixpath.split(work)
        if posixpath.dirname(repo_dir) != parent or w != uuid12:
            return None
        if name != SOCKET_NAME and not _SCRATCH_FILE.fullmatch(name):
            return None
        found.add(work)
    return found.pop() if len(found) == 1 else None


def cleanup_domain(dom: Any, checkpoint_prefix: str, scratch_dir: str,
                   files: HostFiles | None = None) -> list[str]:
    """Clean one domain's leftovers; a list of what was done (empty: nothing to do).

    ``files`` reaches the hypervisor host (default: this machine). For a remote host the
    work directory's lease is held while cleaning, so no other machine starts meanwhile.
    """
    fs: HostFiles = files if files is not None else LocalFiles()
    m = lv()
    done: list[str] = []
    with libvirt_errors("inspecting domain"):
        uuid = dom.UUIDString()
        active = bool(dom.isActive())
        name = dom.name()
    workdir = state.workdir_for(scratch_dir, uuid)
    fs.acquire_lease(workdir, name)
    st = fs.read_state(workdir)
    if st is not None and fs.owner_alive(st, workdir):
        raise VMLocked(f"backup of {st.domain} still running (pid {st.pid} on {st.host})")
    if st is not None:
        done += fs.reap(st)

    if active and backup_job_active(dom):
        done += _leftover_job(dom, scratch_dir, uuid, fs)

    if active:
        with libvirt_errors("reading domain XML"):
            live = dom.XMLDesc(0)
        for target, path in overlay.active_overlays(live, scratch_dir).items():
            overlay.commit(dom, target)
            fs.unlink(path)
            done.append(f"merged leftover overlay of {target}")
    with libvirt_errors("reading domain XML"):
        persistent = bool(dom.isPersistent())
        inactive = dom.XMLDesc(m.VIR_DOMAIN_XML_INACTIVE | m.VIR_DOMAIN_XML_SECURE) \
            if persistent else ""
    stale = overlay.active_overlays(inactive, scratch_dir) if persistent else {}
    if stale and not isinstance(fs, LocalFiles):
        raise HypervisorError(f"{name} is defined on vmdr overlays {sorted(stale.values())}; "
                              "repair it on the hypervisor host with a local vmdr")
    if stale:
        originals: dict[str, tuple[str, str]] = {}
        for target, path in stale.items():
            if not active and os.path.exists(path):
                overlay.commit_offline(path)
            if st is not None and target in st.overlays:
                _o, orig, fmt = st.overlays[target]
                originals[target] = (orig, fmt)
            else:
                originals[target] = overlay.backing_of(path)
        with libvirt_errors("redefining domain without overlays"):
            dom.connect().defineXML(overlay.restore_sources(inactive, originals))
        for target, path in stale.items():
            if not active:
                fs.unlink(path)
            done.append(f"restored original image of {target} in the persistent definition")

    if st is not None and st.checkpoint and checkpoints.is_ours(st.checkpoint, checkpoint_prefix):
        if st.committed:
            for cp in checkpoints.delete_others(dom, checkpoint_prefix, st.checkpoint):
                done.append(f"deleted superseded checkpoint {cp}")
        else:
            with libvirt_errors(f"deleting checkpoint {st.checkpoint}"):
                if checkpoints.delete(dom, st.checkpoint):
                    done.append(f"deleted half-made checkpoint {st.checkpoint}")

    removed = fs.remove_workdir(workdir)
    if removed:
        done.append(f"removed {len(removed)} leftover file(s) from {workdir}")
    return done


def _leftover_job(dom: Any, scratch_dir: str, uuid: str, fs: HostFiles) -> list[str]:
    """Abort a backup job left by a dead vmdr run (ours, or another repository's)."""
    with libvirt_errors("reading backup job"):
        xml = dom.backupGetXMLDesc(0)
    if job_is_ours(xml, scratch_dir, fs.realpath):
        return ["aborted leftover backup job"] if abort_backup_job(dom) else []
    other = vmdr_job_workdir(xml, scratch_dir, uuid, fs.realpath)
    if other is None:
        raise HypervisorError("a backup job is active on this domain that vmdr did not start "
                              "(another tool?); not touching it")
    st = fs.read_state(other)
    if st is None or st.uuid.replace("-", "")[:12] != uuid.replace("-", "")[:12]:
        raise HypervisorError(f"a vmdr backup job for another repository ({other}) is active "
                              "and its state file is missing; not touching it")
    if fs.owner_alive(st, other):
        raise VMLocked(f"backup of {st.domain} for another repository is running "
                       f"(pid {st.pid} on {st.host})")
    done = fs.reap(st)
    if abort_backup_job(dom):
        done.append(f"aborted leftover backup job of another repository ({other})")
    if st.checkpoint and not st.committed and _VMDR_PREFIX.fullmatch(st.prefix) \
            and checkpoints.is_ours(st.checkpoint, st.prefix):
        with libvirt_errors(f"deleting checkpoint {st.checkpoint}"):
            if checkpoints.delete(dom, st.checkpoint):
                done.append(f"deleted half-made checkpoint {st.checkpoint}")
    fs.remove_workdir(other)
    return done
