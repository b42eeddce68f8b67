"""``vmdr restore``: disks and configuration back as a VM that boots.

The seed's three steps — restore the disks and config, register the VM, boot it — in
one job: sparse disk images into ``--target-dir``, the domain XML rewritten (disk paths;
with a new name also a new UUID and new MACs), ``--define`` on any libvirt connection,
``--start`` and wait for the heartbeat, reporting how long the boot took.

A successful restore is recorded in the repository as an attachment of the snapshot (kind
``restore``: bytes, time taken, heartbeat), so the plan estimates RTOs from measured
restores. Recording is best effort: a repository that refuses the write only costs a
warning, never the restore.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from vmdr.diskio.images import (
    atomic_write,
    check_target,
    commit_file,
    discard,
    partial_name,
    sweep_partials,
)
from vmdr.errors import DomainNotFound, IntegrityError, UsageError, VmdrError
from vmdr.events import Event, JobEvents, JobWarning
from vmdr.hypervisor import Hypervisor, rewrite_domain_xml
from vmdr.hypervisor.console import console_log, relocate_console_logs
from vmdr.jobs import diskcopy
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository

EXT = {"qcow2": "qcow2", "raw": "img", "vmdk": "vmdk"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$")
log = logging.getLogger(__name__)


@dataclass
class RestoreOptions:
    target_dir: str
    name: str | None = None
    format: str = "qcow2"
    define: bool = False
    start: bool = False
    force: bool = False
    disks: list[str] = field(default_factory=list)
    heartbeat: str | None = None  # None/"agent": guest-agent ping; else a console regex
    timeout: float = 300.0


def restore_vm(
    repo: Repository, snap: Snapshot, opts: RestoreOptions, hv: Hypervisor | None,
    events: JobEvents | None = None,
) -> dict[str, Any]:
    ev = events or JobEvents()
    t0 = time.monotonic()
    if snap.meta.get("kind") != "vm":
        raise UsageError(f"{snap.name}@{snap.short_id} is an image snapshot; use "
                         "'vmdr image restore'")
    new_name = opts.name or snap.name
    if not _NAME_RE.match(new_name):
        raise UsageError(f"invalid VM name {new_name!r}")
    if opts.start and not opts.define:
        raise UsageError("--start needs --define")
    if opts.define and hv is None:
        raise UsageError("--define needs a libvirt connection")
    disks = [d for d in snap.disks if not opts.disks or d.name in opts.disks]
    unknown = set(opts.disks) - {d.name for d in snap.disks}
    if unknown:
        raise UsageError(f"snapshot {snap.short_id} has no disk {sorted(unknown)[0]!r}")
    if not disks:
        raise UsageError(f"snapshot {snap.short_id} has no disks")
    target_dir = os.path.abspath(opts.target_dir)
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
        raise UsageError(f"--target-dir {target_dir} is not a directory")
    paths = {d.name: os.path.join(target_dir, f"{new_name}-{d.name}.{EXT[opts.format]}")
             for d in disks}
    for d in disks if os.path.isdir(target_dir) else ():  # existing targets: refused
        _, is_block = check_target(paths[d.name], opts.force)  # without --force
        if is_block or os.path.islink(paths[d.name]):
            raise UsageError(f"{paths[d.name]} is not a regular file (a link or a device); "
                             "remove it or pick another --target-dir")
    partial = {d.name for d in disks} != {d.name for d in snap.disks}
    if partial and opts.define:
        raise UsageError("--disk restores single disks; it cannot be combined with --define "
                         "(the VM would share its other disks with the original)")
    cfg = snap.meta.get("config") or {}
    nvram_path = (os.path.join(target_dir, f"{new_name}_VARS.fd")
                  if cfg.get("nvram") and not partial else None)
    xml = None if partial else _domain_xml(snap, cfg, new_name, paths, opts.format, nvram_path,
                                           target_dir)
    if opts.define and hv is not None:
        _check_free_name(hv, new_name, opts.force)
    try:
        os.makedirs(target_dir, exist_ok=True)  # only now: a refused restore creates nothing
    except OSError as exc:
        raise UsageError(f"--target-dir {target_dir}: {exc.strerror}") from None
    ev.phase("write", f"restoring {len(disks)} disk{'s' if len(disks) != 1 else ''} of "
             f"{snap.name}@{snap.short_id} into {target_dir}", new_name)
    written = 0
    # Every disk goes to a temporary name first; only when all of them are complete and
    # fsynced are they renamed into place, so a failed or killed restore never leaves a
    # partial disk under its final name, nor (with --force) destroys the old one.
    for p in paths.values():
        sweep_partials(p)
    temps = {d.name: partial_name(paths[d.name]) for d in disks}
    try:
        for d in disks:
            written += diskcopy.restore(repo, d, temps[d.name], opts.format, False,
                                        ev.progress(f"{new_name}/{d.name}"))
        for d in disks:
            commit_file(temps[d.name], paths[d.name])
    except BaseException:
        for t in temps.values():
            discard(t)
        raise
    if nvram_path:
        atomic_write(nvram_path, base64.b64decode(cfg["nvram"]))
    xml_path = None
    if xml is not None:
        xml_path = os.path.join(target_dir, f"{new_name}.xml")
        atomic_write(xml_path, xml.encode("utf-8"))  # 0600: it may hold secrets
    result: dict[str, Any] = {
        "snapshot": snap.id, "vm": new_name, "target_dir": target_dir, "format": opts.format,
        "disks": paths, "xml": xml_path, "bytes_written": written, "defined": False,
        "started": False, "heartbeat_s": None,
    }
    result["restore_s"] = round(time.monotonic() - t0, 3)
    if opts.define and hv is not None and xml is not None:
        ev.phase("define", f"defining {new_name} on {hv.uri}", new_name)
        hv.define(xml)
        result["defined"] = True
        if opts.start:
            ev.phase("boot", f"booting {new_name}, waiting for its heartbeat", new_name)
            t1 = time.monotonic()
            hv.start(new_name)
            result["started"] = True
            agent = opts.heartbeat in (None, "agent")
            result["heartbeat_s"] = round(hv.wait_heartbeat(
                new_name, agent=agent, console_pattern=None if agent else opts.heartbeat,
                console_log=console_log(xml) if not agent else None, timeout=opts.timeout,
            ), 3)
            result["boot_s"] = round(time.monotonic() - t1, 3)
    result["duration_s"] = round(time.monotonic() - t0, 3)
    # where it was restored: the libvirt URI it was defined on (without its query, which
    # may name a key file), else this host
    target = (hv.uri.split("?", 1)[0] if opts.define and hv is not None
              else socket.gethostname())
    result["attachment"] = record_restore(repo, snap, {
        "kind": "restore", "bytes_written": written, "size": sum(d.size for d in disks),
        "restore_s": result["restore_s"], "heartbeat_s": result["heartbeat_s"],
        "target": target, "format": opts.format, "repository": repo.id}, events)
    return result


def record_restore(repo: Repository, snap: Snapshot, doc: dict[str, Any],
                   events: JobEvents | None = None) -> str | None:
    """Attach *doc* to the snapshot; on failure emit a warning and return None.

    The restore has already succeeded: a read-only, full or unreachable repository must
    not turn it into a failure. (The attachment is a new object, like a verification
    record, so the shared lock the restore holds is enough.)
    """
    try:
        return repo.add_attachment(snap.id, doc)
    except Exception as exc:  # any failure to record: the restore itself stands
        why = exc.message if isinstance(exc, VmdrError) else f"{type(exc).__name__}: {exc}"
        (events or JobEvents(_log_sink)).warning(
            f"restored {snap.name}@{snap.short_id}, but could not record the restore in the "
            f"repository: {why}")
        return None


def _log_sink(event: Event) -> None:
    if isinstance(event, JobWarning):
        log.warning("%s", event.message)


def _domain_xml(
    snap: Snapshot, cfg: dict[str, Any], new_name: str, paths: dict[str, str], fmt: str,
    nvram_path: str | None, target_dir: str,
) -> str:
    """The domain XML for the restored VM; checked before any disk is written."""
    if not cfg.get("domain_xml"):
        raise IntegrityError(f"snapshot {snap.short_id} holds no domain XML")
    try:
        xml = rewrite_domain_xml(
            cfg["domain_xml"], new_name=new_name if new_name != snap.name else None,
            disk_paths={n: (p, fmt) for n, p in paths.items()}, nvram_path=nvram_path,
        )
    except ValueError as exc:
        raise IntegrityError(f"snapshot {snap.short_id}: its domain XML cannot be "
                             f"restored ({exc})") from None
    if new_name != snap.name:
        xml = relocate_console_logs(xml, target_dir, new_name)
    return xml


def _check_free_name(hv: Hypervisor, name: str, force: bool) -> None:
    try:
        info = hv.domain(name)
    except DomainNotFound:
        return
    if not force:
        raise UsageError(f"a domain named {name!r} exists on {hv.uri}; pick --name or "
                         "use --force to replace it")
    if info.running:
        raise UsageError(f"domain {name!r} is running; stop it before replacing it")
    try:
        hv.undefine(name)
    except VmdrError as exc:
        raise UsageError(f"cannot replace domain {name!r}: {exc.message}") from None
