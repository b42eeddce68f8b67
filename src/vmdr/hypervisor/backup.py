"""A backup session: pull-mode backup job (``checkpoint``), overlay (``overlay``) or
direct read of a stopped domain (``offline``). See the package docstring for the contract.

The hypervisor host's files (work directory, state file, sockets, stopped images) are
reached through :mod:`.hostfiles`: directly for a local URI, over ssh for ``qemu+ssh://``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

from vmdr.errors import HypervisorError, UsageError
from vmdr.timeutil import utcnow

from . import agent, bitmaps, checkpoints, overlay, state
from ._compat import lv, parse_xml
from .cleanup import abort_backup_job, job_uses_socket
from .domain import DiskInfo, DomainInfo
from .errors import libvirt_errors
from .hostfiles import HostFiles, LocalFiles, RemoteFiles
from .nbd import BASE_ALLOCATION, Reader, dirty_context, unix_export
from .session import (
    MAX_SOCKET_PATH,
    SOCKET_NAME,
    BackupOptions,
    DiskSource,
    Method,
    image_reader,
    inconsistent,
    pull_backup_xml,
    unsupported,
)

__all__ = ["BackupOptions", "BackupSession", "DiskSource", "Method", "pull_backup_xml"]

_image_reader = image_reader  # module attribute: unit tests swap the readers here


class BackupSession:
    """Context manager around one backup; call :meth:`commit` when the data is safe."""

    def __init__(self, dom: Any, info: DomainInfo, opts: BackupOptions, *, local: bool = True,
                 files: HostFiles | None = None) -> None:
        self._dom = dom
        self.domain = info
        self.opts = opts
        self._files: HostFiles = files if files is not None else LocalFiles()
        self._local = local and not isinstance(self._files, RemoteFiles)
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
        self._job_maybe = False  # backupBegin was called; it may have started the job
        self._socket: str | None = None
        self._pending_checkpoint: str | None = None
        self._overlays: dict[str, str] = {}
        self._closed = False
        self._owns_workdir = False
        self.orphans_removed: list[str] = []

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
        except BaseException as exc:  # a second Ctrl-C must not hide the first
            ev.add_note(f"vmdr: cleanup after the error also failed: {exc!r}")

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
        remote = isinstance(self._files, RemoteFiles)
        if method == "overlay" and remote:
            raise UsageError(f"method 'overlay' is not supported over {self._files.remote} "
                             "(use 'checkpoint'; overlay repair after a crash needs local files)")
        if not remote and not self._local:
            raise HypervisorError(f"method {method!r} needs a local or qemu+ssh:// hypervisor")
        self._files.open()
        self._files.acquire_lease(self.workdir, self.domain.name)
        self._owns_workdir = True  # (another live run's work directory is never removed)
        self._files.make_workdir(self.opts.scratch_dir, self.domain.uuid, self.opts.qemu_user)
        self.method = method
        self._state = state.BackupState(
            domain=self.domain.name, uuid=self.domain.uuid, prefix=self.opts.checkpoint_prefix,
            method=method, started=self._now().isoformat())
        self._files.write_state(self.workdir, self._state)
        if method == "checkpoint":
            try:
                self._start_pull(selected)
            except HypervisorError as exc:
                if self.opts.method != "auto" or not unsupported(exc):
                    raise
                if remote:
                    raise HypervisorError(f"pull-mode backup unavailable ({exc}); the overlay "
                                          "fallback is not supported over ssh") from exc
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
            self._files.write_state(self.workdir, self._state)
        self.committed = True
        if self.checkpoint is not None:
            try:
                self.deleted_checkpoints = checkpoints.delete_others(
                    self._dom, self.opts.checkpoint_prefix, self.checkpoint)
            except HypervisorError as exc:
                self.warnings.append(f"could not delete an older checkpoint: {exc}")
            self._remove_orphans()  # offline: in close(), once our readers let go of the images

    def _remove_orphans(self) -> None:
        """After a full: drop our bitmaps whose checkpoint libvirt lost (see :mod:`.bitmaps`)."""
        if not any(d.incremental for d in self.disks):
            self.orphans_removed = bitmaps.remove_after_full(
                self._dom, self.method == "offline", [d.info for d in self.disks],
                self.opts.checkpoint_prefix, self._files.command, self.warnings)

    def close(self) -> None:
        """Tear down: readers, job or overlays, uncommitted checkpoint, scratch files.

        Every step runs even if an earlier one fails or is interrupted (KeyboardInterrupt,
        SystemExit: re-raised once the rest is done). The state file is kept whenever a
        step did not finish, so the next :func:`cleanup_leftovers` completes the job.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        stop: list[BaseException] = []

        def step(fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(str(exc))
            except BaseException as exc:  # finish cleaning up first
                errors.append(f"interrupted ({exc.__class__.__name__})")
                stop.append(exc)

        for d in self.disks:
            step(d.reader.close)
        if self._job_started or self._job_maybe:
            step(self._abort_job)
        for target in list(self._overlays):
            step(lambda t=target: self._merge_overlay(t))  # type: ignore[misc]
        name = self.checkpoint or self._pending_checkpoint
        if name is not None and not self.committed:
            step(lambda: checkpoints.delete(self._dom, name))
            self.checkpoint = self.checkpoint_xml = self._pending_checkpoint = None
        if self.committed and self.method == "offline" and not errors:
            step(self._remove_orphans)
        if not errors and not self._overlays and self._owns_workdir:
            step(lambda: self._files.remove_workdir(self.workdir))
        step(self._files.close)
        if stop:
            raise stop[0]
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
        return self.opts.now or utcnow()

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
        sock = f"{self.workdir}/{SOCKET_NAME}"
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise UsageError(f"scratch directory path too long for a unix socket: {sock}")
        assert self._state is not None
        self._state.checkpoint, self._state.socket = name, sock
        self._files.write_state(self.workdir, self._state)
        self._socket, self._pending_checkpoint = sock, name
        cp_xml = (checkpoints.build_xml(name, self.domain.disks, bitmap_disks)
                  if name is not None else None)
        frozen = self._freeze()
        try:
            try:
                self._begin(selected, decisions, sock, cp_xml)
            except HypervisorError as exc:
                if not any(v is None for v in decisions.values()) or not inconsistent(exc):
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
        local_sock = self._files.connectable(sock, SOCKET_NAME)
        for d in selected:
            inc = decisions.get(d.target) is None
            export, bitmap = exports.get(d.target, (d.target, f"backup-{d.target}"))
            ctx = f"qemu:dirty-bitmap:{bitmap}" if inc else BASE_ALLOCATION
            if inc and not bitmap:
                ctx = dirty_context(d.target)
            reader = unix_export(local_sock, export, ctx)
            self.disks.append(DiskSource(d, inc, reader, decisions.get(d.target)
                                         if inc_from is not None else None))

    def _begin(self, selected: list[DiskInfo], decisions: dict[str, str | None], sock: str,
               cp_xml: str | None) -> None:
        xml = pull_backup_xml(self.domain.disks, selected, decisions,
                              self.opts.incremental_from, sock, self.workdir)
        self._job_maybe = True
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
        confirmed = self._job_started
        self._job_started = self._job_maybe = False
        # after an interrupted backupBegin, only abort the job if it is the one we asked for
        if confirmed or (self._socket and job_uses_socket(self._dom, self._socket)):
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
        self._files.write_state(self.workdir, self._state)
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
        """Read the stopped domain's images; with ``incremental_from``, only what the
        checkpoint's persistent qcow2 bitmap marks (a disk without a usable one: in full).
        No new checkpoint is made: the next run reads from the same one again."""
        inc = self.opts.incremental_from
        with libvirt_errors(f"checkpoint {inc}"):
            bitmaps_ = checkpoints.offline_bitmaps(self._dom, selected,
                                                   self.opts.checkpoint_prefix, inc)
        for d in selected:
            if d.type not in ("file", "block") or d.source is None:
                self._skip(d, f"type='{d.type}' cannot be read while the domain is stopped")
                continue
            bm = bitmaps_.get(d.target)
            if bm is not None:
                try:
                    self.disks.append(DiskSource(d, True, self._offline_reader(d, bm)))
                    continue
                except HypervisorError as exc:
                    self.warnings.append(f"disk {d.target}: full read (bitmap {bm} not "
                                         f"usable: {exc})")
            elif inc is not None:
                self.warnings.append(f"disk {d.target}: full read (no bitmap of checkpoint "
                                     f"{inc} for it)")
            self.disks.append(DiskSource(d, False, self._offline_reader(d, None)))

    def _offline_reader(self, d: DiskInfo, bitmap: str | None) -> Reader:
        if isinstance(self._files, RemoteFiles):
            return self._files.image_reader(d, self.workdir, bitmap)
        if bitmap is None:
            return _image_reader(d, lock=True)
        return _image_reader(d, lock=True, bitmap=bitmap)


