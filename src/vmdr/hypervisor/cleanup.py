"""Find and undo what an interrupted backup left behind (vmdr crashed, killed, Ctrl-C).

Call it under the VM lock, before every backup. It only touches vmdr's own things: a
backup job whose socket or scratch files are in our scratch directory, overlays named by
:mod:`.overlay` in our scratch directory, and an uncommitted checkpoint of this prefix.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vmdr.errors import HypervisorError, VMLocked

from . import checkpoints, overlay, state
from ._compat import lv, parse_xml
from .errors import is_code, libvirt_errors


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


def job_is_ours(backup_xml: str, scratch_dir: str) -> bool:
    """True if a backup job's socket or scratch files live in our scratch directory."""
    root = os.path.realpath(scratch_dir) + os.sep
    el = parse_xml(backup_xml)
    paths = [s.get("socket", "") for s in el.findall("server")]
    paths += [s.get("file", "") for s in el.iter("scratch")]
    return any(p and os.path.realpath(p).startswith(root) for p in paths)


def cleanup_domain(dom: Any, checkpoint_prefix: str, scratch_dir: str) -> list[str]:
    """Clean one domain's leftovers; a list of what was done (empty: nothing to do)."""
    m = lv()
    done: list[str] = []
    with libvirt_errors("inspecting domain"):
        uuid = dom.UUIDString()
        active = bool(dom.isActive())
    workdir = state.workdir_for(scratch_dir, uuid)
    st = state.read(workdir)
    if st is not None and state.owner_alive(st):
        raise VMLocked(f"backup of {st.domain} still running (pid {st.pid})")

    if active and backup_job_active(dom):
        with libvirt_errors("reading backup job"):
            xml = dom.backupGetXMLDesc(0)
        if not job_is_ours(xml, scratch_dir):
            raise HypervisorError("a backup job is active on this domain that does not use this "
                                  "scratch directory (another tool, or vmdr for another "
                                  "repository); not touching it")
        if abort_backup_job(dom):
            done.append("aborted leftover backup job")

    if active:
        with libvirt_errors("reading domain XML"):
            live = dom.XMLDesc(0)
        for target, path in overlay.active_overlays(live, scratch_dir).items():
            overlay.commit(dom, target)
            _unlink(path)
            done.append(f"merged leftover overlay of {target}")
    with libvirt_errors("reading domain XML"):
        persistent = bool(dom.isPersistent())
        inactive = dom.XMLDesc(m.VIR_DOMAIN_XML_INACTIVE | m.VIR_DOMAIN_XML_SECURE) \
            if persistent else ""
    stale = overlay.active_overlays(inactive, scratch_dir) if persistent else {}
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
                _unlink(path)
            done.append(f"restored original image of {target} in the persistent definition")

    if st is not None and st.checkpoint and checkpoints.is_ours(st.checkpoint, checkpoint_prefix):
        if st.committed:
            for name in checkpoints.delete_others(dom, checkpoint_prefix, st.checkpoint):
                done.append(f"deleted superseded checkpoint {name}")
        else:
            with libvirt_errors(f"deleting checkpoint {st.checkpoint}"):
                if checkpoints.delete(dom, st.checkpoint):
                    done.append(f"deleted half-made checkpoint {st.checkpoint}")

    if os.path.isdir(workdir):
        removed = state.remove_workdir(workdir)
        if removed:
            done.append(f"removed {len(removed)} leftover file(s) from {workdir}")
    return done


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
