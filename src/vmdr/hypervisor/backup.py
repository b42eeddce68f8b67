"""A backup session: pull-mode backup job (``checkpoint``), overlay (``overlay``) or
direct read of a stopped domain (``offline``). See the package docstring for the contract.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

from vmdr.errors import CheckpointMissing, HypervisorError, UsageError

from . import agent, checkpoints, overlay, state
from ._compat import lv, parse_xml
from .cleanup import abort_backup_job
from .domain import DiskInfo, DomainInfo
from .errors import is_code, libvirt_errors
from .nbd import (
    BASE_ALLOCATION,
    Extent,
    FileReader,
    Reader,
    dirty_context,
    image_export,
    unix_export,
)

Method = Literal["auto", "checkpoint", "overlay", "offline"]
SOCKET_NAME = "nbd.sock"
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the trailing NUL


@dataclass
class DiskSource:
    """One disk being read by a backup session."""

    info: DiskInfo
    incremental: bool
    reader: Reader
    full_reason: str | None = None  # why a requested incremental became a full

    @property
    def size(self) -> int:
        """Virtual size in bytes as the reader sees it."""
        return self.reader.size

    def extents(self) -> Iterator[Extent]:
        """(offset, length, is_data): allocation extents (full) or dirty extents (incremental)."""
        return self.reader.extents()

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset``; thread-safe."""
        return self.reader.read(offset, length)


@dataclass
class BackupOptions:
    """What the jobs layer asks for."""

    checkpoint_prefix: str
    scratch_dir: str
    disks: Sequence[str] | None = None
    incremental_from: str | None = None
    quiesce: bool = False
    method: Method = "auto"
    agent_timeout: int = 3
    freeze_timeout: int = 60
    qemu_user: str | None = None
    now: datetime | None = None


class BackupSession:
    """Context manager around one backup; call :meth:`commit` when the data is safe."""

    def __init__(self, dom: Any, info: DomainInfo, opts: BackupOptions, *, local: bool) -> None:
        self._dom = dom
        self.domain = info
        self.opts = opts
        self._local = local
        self.method: str = opts.method
        self.consistency: Literal["quiesced", "crash"] = "crash"
        self.checkpoint: str | None = None
        self.checkpoint_xml: str | None = None
        self.disks: list[DiskSource] = []
        self.skipped: list[DiskInfo] = []
        self.warnings: list[str] = []
        self.committed = False
        self.deleted_checkpoints: list[str] = []
        self.workdir = state.workdir_for(opts.scratch_dir, info.uuid)
        self._state: state.BackupState | None = None
        self._job_started = False
        self._overlays: dict[str, str] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> BackupSession:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if ev is None:
            self.close()
            return
        try:  # keep the original error; a cleanup failure becomes a note on it
            self.close()
        except Exception as exc:
            ev.add_note(f"vmdr: cleanup after the error also failed: {exc}")

    def start(self) -> None:
        """Select disks, pick the method and put the backup in place."""
        selected = self._select()
        running = self.domain.running
        method = self.opts.method
        if method == "auto":
            method = "checkpoint" if running else "offline"
        if method in ("checkpoint", "overlay") and not running:
            raise HypervisorError(f"{self.domain.name} is not running: use method 'offline'")
        if method == "offline" and running:
            raise HypervisorError(f"{self.domain.name} is running: cannot read its images offline")
        if method in ("overlay", "offline") and not self._local:
            raise HypervisorError(f"method {method!r} reads image files: needs a local hypervisor")
        if method == "checkpoint" and not self._local:
            raise HypervisorError("live backup over a remote URI is not supported yet (NBD socket)")
        os.makedirs(self.opts.scratch_dir, exist_ok=True)
        state.make_workdir(self.opts.scratch_dir, self.domain.uuid, self.opts.qemu_user)
        self.method = method
        self._state = state.BackupState(
            domain=self.domain.name, uuid=self.domain.uuid, prefix=self.opts.checkpoint_prefix,
            method=method, started=self._now().isoformat())
        state.write(self.workdir, self._state)
        if method == "checkpoint":
            try:
                self._start_pull(selected)
            except HypervisorError as exc:
                if self.opts.method != "auto" or not _unsupported(exc):
                    raise
                self.warnings.append(f"pull-mode backup unavailable ({exc}); using overlays")
                self.method = self._state.method = "overlay"
                self._start_overlay(selected)
        elif method == "overlay":
            self._start_overlay(selected)
        else:
            self._start_offline(selected)

    def commit(self) -> None:
        """Mark success: keep the new checkpoint, delete older ones of this prefix.

        Raises HypervisorError if an offline backup cannot be trusted (the domain started
        while its raw images were read). Failing to delete an older checkpoint is only a
        warning: the next :func:`cleanup_leftovers` finishes the job.
        """
        if self.method == "offline":
            with libvirt_errors("checking domain"):
                if self._dom.isActive():
                    raise HypervisorError(f"{self.domain.name} was started during the offline "
                                          "backup; its images may be inconsistent")
        if self._state is not None:
            self._state.committed = True
            state.write(self.workdir, self._state)
        self.committed = True
        if self.checkpoint is not None:
            try:
                self.deleted_checkpoints = checkpoints.delete_others(
                    self._dom, self.opts.checkpoint_prefix, self.checkpoint)
            except HypervisorError as exc:
                self.warnings.append(f"could not delete an older checkpoint: {exc}")

    def close(self) -> None:
        """Tear down: readers, job or overlays, uncommitted checkpoint, scratch files."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for d in self.disks:
            _try(errors, d.reader.close)
        if self._job_started:
            _try(errors, self._abort_job)
        for target in list(self._overlays):
            _try(errors, lambda t=target: self._merge_overlay(t))
        if self.checkpoint is not None and not self.committed:
            _try(errors, lambda: checkpoints.delete(self._dom, self.checkpoint or ""))
            self.checkpoint = None
            self.checkpoint_xml = None
        if not errors and not self._overlays:
            state.remove_workdir(self.workdir)
        if errors:
            raise HypervisorError("backup cleanup failed: " + "; ".join(errors))

    # -- disk selection ----------------------------------------------------------------------

    def _select(self) -> list[DiskInfo]:
        by_target = {d.target: d for d in self.domain.disks}
        wanted = list(self.opts.disks) if self.opts.disks is not None else list(by_target)
        unknown = [t for t in wanted if t not in by_target]
        if unknown:
            raise UsageError(f"{self.domain.name} has no disk {', '.join(unknown)}")
        out = []
        for t in wanted:
            d = by_target[t]
            if d.skip_reason is not None:
                self._skip(d, d.skip_reason)
            else:
                out.append(d)
        return out

    def _skip(self, disk: DiskInfo, reason: str) -> None:
        self.skipped.append(replace(disk, skip_reason=reason))
        self.warnings.append(f"disk {disk.target} skipped: {reason}")

    def _now(self) -> datetime:
        return self.opts.now or datetime.now(UTC)

    # -- checkpoint (pull mode) --------------------------------------------------------------

    def _start_pull(self, selected: list[DiskInfo]) -> None:
        prefix = self.opts.checkpoint_prefix
        inc_from = self.opts.incremental_from
        with libvirt_errors(f"checkpoint {inc_from}"):
            sized = checkpoints.sized_xml(self._dom, inc_from) if inc_from else None
        decisions = checkpoints.decide(selected, prefix, inc_from, sized)
        if inc_from is not None:
            for t, why in decisions.items():
                if why is not None:
                    self.warnings.append(f"disk {t}: full backup ({why})")
        bitmap_disks = [d.target for d in selected if checkpoints.wants_bitmap(d)]
        name = None
        if bitmap_disks:
            name = checkpoints.checkpoint_name(prefix, self._now())
            existing = set(checkpoints.list_ours(self._dom, prefix))
            base, n = name, 1
            while name in existing:
                name, n = f"{base}-{n}", n + 1
        sock = os.path.join(self.workdir, SOCKET_NAME)
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise UsageError(f"scratch directory path too long for a unix socket: {sock}")
        assert self._state is not None
        self._state.checkpoint, self._state.socket = name, sock
        state.write(self.workdir, self._state)
        cp_xml = (checkpoints.build_xml(name, self.domain.disks, bitmap_disks)
                  if name is not None else None)
        frozen = self._freeze()
        try:
            try:
                self._begin(selected, decisions, sock, cp_xml)
            except HypervisorError as exc:
                if not any(v is None for v in decisions.values()) or not _inconsistent(exc):
                    raise
                self.warnings.append(f"libvirt rejected the incremental ({exc}); doing a full")
                decisions = {t: f"libvirt: {exc}" for t in decisions}
                self._begin(selected, decisions, sock, cp_xml)
        finally:
            if frozen:
                self._thaw()
        self.checkpoint = name
        if name is not None:
            self.checkpoint_xml = checkpoints.full_xml(self._dom, name)
        exports = self._exports()
        for d in selected:
            inc = decisions.get(d.target) is None
            export, bitmap = exports.get(d.target, (d.target, f"backup-{d.target}"))
            ctx = f"qemu:dirty-bitmap:{bitmap}" if inc else BASE_ALLOCATION
            if inc and not bitmap:
                ctx = dirty_context(d.target)
            reader = unix_export(sock, export, ctx)
            self.disks.append(DiskSource(d, inc, reader, decisions.get(d.target)
                                         if inc_from is not None else None))

    def _begin(self, selected: list[DiskInfo], decisions: dict[str, str | None], sock: str,
               cp_xml: str | None) -> None:
        xml = pull_backup_xml(self.domain.disks, selected, decisions,
                              self.opts.incremental_from, sock, self.workdir)
        with libvirt_errors("starting backup job"):
            self._dom.backupBegin(xml, cp_xml, 0)
        self._job_started = True

    def _exports(self) -> dict[str, tuple[str, str]]:
        try:
            xml = self._dom.backupGetXMLDesc(0)
        except lv().libvirtError:
            return {}
        out = {}
        for el in parse_xml(xml).findall("./disks/disk"):
            if el.get("backup") == "yes":
                name = el.get("name", "")
                out[name] = (el.get("exportname") or name, el.get("exportbitmap") or "")
        return out

    def _abort_job(self) -> None:
        self._job_started = False
        abort_backup_job(self._dom)

    # -- quiesce -----------------------------------------------------------------------------

    def _freeze(self) -> bool:
        if not self.opts.quiesce:
            return False
        if not agent.ping(self._dom, self.opts.agent_timeout):
            self.warnings.append("guest agent not answering: crash-consistent backup")
            return False
        try:
            agent.freeze(self._dom, self.opts.freeze_timeout)
        except HypervisorError as exc:
            self.warnings.append(f"fsfreeze failed ({exc}): crash-consistent backup")
            self._thaw()
            return False
        self.consistency = "quiesced"
        return True

    def _thaw(self) -> None:
        try:
            agent.thaw(self._dom)
        except HypervisorError as exc:
            self.warnings.append(f"fsthaw failed: {exc}")

    # -- overlay -----------------------------------------------------------------------------

    def _start_overlay(self, selected: list[DiskInfo]) -> None:
        disks = []
        for d in selected:
            if d.type not in ("file", "block") or d.source is None:
                self._skip(d, f"type='{d.type}' cannot be read directly in overlay mode")
            else:
                disks.append(d)
        # read-only disks cannot change: read them as they are, without an overlay
        overlays = {d.target: overlay.overlay_path(self.workdir, d.target)
                    for d in disks if not d.readonly}
        if not overlays:
            self.disks.extend(DiskSource(d, False, _image_reader(d)) for d in disks)
            return
        assert self._state is not None
        self._state.overlays = {d.target: [overlays[d.target], d.source or "", d.format or "raw"]
                                for d in disks if d.target in overlays}
        state.write(self.workdir, self._state)
        quiesce = False
        if self.opts.quiesce:
            if agent.ping(self._dom, self.opts.agent_timeout):
                quiesce = True
            else:
                self.warnings.append("guest agent not answering: crash-consistent backup")
        try:
            overlay.create(self._dom, self.domain.disks, overlays, quiesce=quiesce)
        except HypervisorError as exc:
            if not quiesce:
                raise
            self.warnings.append(f"quiesced snapshot failed ({exc}): crash-consistent backup")
            quiesce = False
            overlay.create(self._dom, self.domain.disks, overlays, quiesce=False)
        self.consistency = "quiesced" if quiesce else "crash"
        self._overlays = overlays
        for d in disks:
            self.disks.append(DiskSource(d, False, _image_reader(d)))

    def _merge_overlay(self, target: str) -> None:
        overlay.commit(self._dom, target)
        path = self._overlays.pop(target)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # -- offline -----------------------------------------------------------------------------

    def _start_offline(self, selected: list[DiskInfo]) -> None:
        for d in selected:
            if d.type not in ("file", "block") or d.source is None:
                self._skip(d, f"type='{d.type}' cannot be read while the domain is stopped")
                continue
            self.disks.append(DiskSource(d, False, _image_reader(d, lock=True)))


def _image_reader(d: DiskInfo, *, lock: bool = False) -> Reader:
    """Raw images are read directly (``lock``: as QEMU would lock them); others via qemu-nbd,
    which takes QEMU's own locks."""
    assert d.source is not None
    if (d.format or "raw") == "raw":
        return FileReader(d.source, label=d.target, lock=lock)
    return image_export(d.source, d.format or "raw", label=d.target)


def pull_backup_xml(all_disks: Sequence[DiskInfo], selected: Sequence[DiskInfo],
                    decisions: dict[str, str | None], incremental_from: str | None,
                    socket_path: str, workdir: str) -> str:
    """``<domainbackup mode='pull'>`` with a per-disk full/incremental mode."""
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=socket_path)
    disks = ET.SubElement(root, "disks")
    chosen = {d.target for d in selected}
    for d in all_disks:
        if d.target not in chosen:
            if d.device == "disk" and d.source is not None:
                ET.SubElement(disks, "disk", name=d.target, backup="no")
            continue
        el = ET.SubElement(disks, "disk", name=d.target, backup="yes", type="file")
        if decisions.get(d.target) is None and incremental_from is not None:
            el.set("backupmode", "incremental")
            el.set("incremental", incremental_from)
        else:
            el.set("backupmode", "full")
        ET.SubElement(el, "scratch", file=os.path.join(workdir, f"{d.target}.scratch"))
    return ET.tostring(root, encoding="unicode")


def _inconsistent(exc: HypervisorError) -> bool:
    return isinstance(exc, CheckpointMissing)


def _unsupported(exc: HypervisorError) -> bool:
    cause = exc.__cause__
    return cause is not None and is_code(cause, "VIR_ERR_NO_SUPPORT",
                                         "VIR_ERR_OPERATION_UNSUPPORTED")


def _try(errors: list[str], fn: Any) -> None:
    try:
        fn()
    except Exception as exc:
        errors.append(str(exc))

