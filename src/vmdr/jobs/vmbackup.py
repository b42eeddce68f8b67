"""``vmdr backup``: a running (or stopped) VM's disks and configuration into a snapshot.

Per VM: take the VM lock, clean up whatever an interrupted run left, pick the parent
snapshot and its checkpoint, run the hooks, open a hypervisor backup session (pull-mode
job with a checkpoint, overlay fallback, or offline read), stream every disk into the
repository — dirty extents only for an incremental, reusing the parent's chunk IDs for
the rest — save the manifest, and only then commit the checkpoint.
"""

from __future__ import annotations

import base64
import fnmatch
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vmdr.config import HookConfig
from vmdr.errors import HypervisorError, IntegrityError, UsageError, VmdrError
from vmdr.events import ItemProgress, JobEvents
from vmdr.hypervisor import BackupJob, DiskSource, DomainInfo, Hypervisor, Method
from vmdr.jobs import diskcopy
from vmdr.jobs.hooks import HookRunner
from vmdr.jobs.vmlock import VMLock
from vmdr.repository.manifest import DiskRecord, Snapshot
from vmdr.repository.repo import Repository
from vmdr.repository.writer import WriteStats

log = logging.getLogger(__name__)


@dataclass
class VMBackupOptions:
    mode: str = "auto"  # auto | full | incremental
    consistency: str = "auto"  # auto | quiesce | crash
    method: Method = "auto"
    tags: list[str] = field(default_factory=list)
    scratch_dir: str = "/var/lib/libvirt/qemu/vmdr"
    workers: int = 3
    disk_parallel: int = 2
    exclude_disks: list[str] = field(default_factory=list)
    hooks: HookConfig = field(default_factory=HookConfig)


@dataclass
class VMBackupResult:
    vm: str
    status: str = "failed"  # ok | failed
    snapshot: str | None = None
    mode: str | None = None  # full | incremental
    consistency: str | None = None  # quiesced | crash
    method: str | None = None
    bytes_read: int = 0
    bytes_stored: int = 0
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "snapshot": self.snapshot, "status": self.status,
                "mode": self.mode, "consistency": self.consistency, "method": self.method,
                "bytes_read": self.bytes_read, "bytes_stored": self.bytes_stored,
                "duration_s": round(self.duration_s, 3), "warnings": self.warnings,
                "error": self.error}


def checkpoint_prefix(repo: Repository) -> str:
    """Checkpoints are named per repository, so two repositories never share bitmaps."""
    return f"vmdr-{repo.id[:12]}"


def _parent(repo: Repository, name: str) -> Snapshot | None:
    snaps = [s for s in repo.list_snapshots(name) if s.meta.get("kind") == "vm"]
    return snaps[-1] if snaps else None


def _pick_incremental(
    hv: Hypervisor, info: DomainInfo, parent: Snapshot | None, prefix: str, mode: str,
    warnings: list[str],
) -> str | None:
    if mode == "full" or parent is None or not info.running:
        if mode == "incremental":
            warnings.append("incremental requested but " + (
                "there is no earlier backup" if parent is None else "the VM is not running")
                + "; reading everything")
        return None
    cp = parent.meta.get("checkpoint")
    if not cp or not str(cp).startswith(prefix):
        if mode == "incremental":
            warnings.append("the last backup has no checkpoint; reading everything")
        return None
    if cp not in hv.list_checkpoints(info, prefix):
        saved = parent.meta.get("checkpoint_xml")
        if saved:
            try:
                hv.redefine_checkpoint(info, saved)
                warnings.append(f"libvirt had lost checkpoint {cp}; redefined it from the "
                                "snapshot")
            except VmdrError as exc:
                warnings.append(f"checkpoint {cp} is gone and cannot be redefined "
                                f"({exc.message}); reading everything")
                return None
        else:
            warnings.append(f"checkpoint {cp} is gone; reading everything")
            return None
    return str(cp)


def _vm_config(hv: Hypervisor, info: DomainInfo, warnings: list[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {"domain_xml": info.xml, "uuid": info.uuid, "vcpus": info.vcpus,
                           "memory_kib": info.memory_kib}
    for key, reader in (("nvram", hv.read_nvram), ("tpm_state", hv.read_tpm_state)):
        try:
            data = reader(info)
        except VmdrError as exc:
            warnings.append(f"could not read {key}: {exc.message}")
            continue
        if data is not None:
            cfg[key] = base64.b64encode(data).decode("ascii")
    if info.nvram_path:
        cfg["nvram_path"] = info.nvram_path
    return cfg


def _ingest_disk(
    repo: Repository, d: DiskSource, parent: Snapshot | None, progress: ItemProgress | None,
    workers: int,
) -> tuple[DiskRecord, WriteStats]:
    base = None
    if d.incremental:
        pd = parent.disk(d.info.target) if parent else None
        if pd is None or pd.size != d.size:
            raise IntegrityError(f"disk {d.info.target}: incremental without a matching parent "
                                 "disk; refusing a short backup")
        base = pd.chunks
    extents = [(off, ln) for off, ln, is_data in d.extents() if is_data]
    meta: dict[str, Any] = {"incremental": d.incremental, "source": d.info.source,
                            "bus": d.info.bus}
    if d.full_reason:
        meta["full_reason"] = d.full_reason
    return diskcopy.ingest(repo, d.info.target, d.size, d.info.format or "raw", extents,
                           d.read, base=base, progress=progress, workers=workers, meta=meta)


def backup_vm(
    hv: Hypervisor, repo: Repository, name: str, opts: VMBackupOptions,
    events: JobEvents | None = None,
) -> VMBackupResult:
    """Back up one VM. Errors are returned in the result (and as an ``error`` event of
    item *name*), not raised."""
    res = VMBackupResult(vm=name)
    ev = _VMEvents(events or JobEvents(), name, res)
    t0 = time.monotonic()
    hooks = HookRunner(opts.hooks, name)
    try:
        with VMLock(hv.uri, name):
            _backup_locked(hv, repo, name, opts, res, hooks, ev)
        res.status = "ok"
    except VmdrError as exc:
        res.error, res.exit_code = exc.message, exc.exit_code
    except KeyboardInterrupt:
        res.error, res.exit_code = "interrupted", 130
        raise
    finally:
        res.duration_s = time.monotonic() - t0
        res.warnings.extend(w for w in hooks.warnings if w not in res.warnings)
        ev.flush()
        if res.error is not None:
            ev.events.error(res.error, res.exit_code or 1, name)
        if res.status != "ok":
            try:
                hooks.run("post-backup", "", "failed")
            except VmdrError:
                pass
    return res


class _VMEvents:
    """The job's events for one VM: its warnings (collected in the result by the layers
    below) go out as ``warning`` events as soon as a step ends."""

    def __init__(self, events: JobEvents, vm: str, res: VMBackupResult) -> None:
        self.events, self.vm, self.res = events, vm, res
        self._sent = 0

    def flush(self) -> None:
        for w in self.res.warnings[self._sent:]:
            self.events.warning(w, self.vm)
        self._sent = len(self.res.warnings)

    def phase(self, phase: str, message: str = "") -> None:
        self.flush()
        self.events.phase(phase, message, self.vm)


def _backup_locked(
    hv: Hypervisor, repo: Repository, name: str, opts: VMBackupOptions, res: VMBackupResult,
    hooks: HookRunner, ev: _VMEvents,
) -> None:
    ev.phase("prepare")
    prefix = checkpoint_prefix(repo)
    scratch = os.path.join(opts.scratch_dir, repo.id[:12])
    for what in hv.cleanup_leftovers(name, prefix, scratch):
        res.warnings.append(f"cleaned up after an interrupted run: {what}")
    info = hv.domain(name)
    wanted = [d.target for d in info.disks
              if d.target not in opts.exclude_disks and d.device in ("disk", "lun")]
    if not any(d.imageable for d in info.disks if d.target in wanted):
        raise UsageError(f"{name}: has no disks that can be backed up")
    parent = _parent(repo, name)
    inc_from = _pick_incremental(hv, info, parent, prefix, opts.mode, res.warnings)
    quiesce = opts.consistency != "crash" and info.running
    ev.phase("snapshot")
    hooks.run("pre-backup")
    if quiesce:
        hooks.run("pre-freeze")
    session: BackupJob = hv.backup(
        info, checkpoint_prefix=prefix, scratch_dir=scratch, disks=None,
        incremental_from=inc_from, quiesce=quiesce, method=opts.method,
    )
    with session as s:
        if quiesce:
            hooks.run("post-thaw")
        if opts.consistency == "quiesce" and s.consistency != "quiesced":
            raise HypervisorError(f"{name}: the guest agent did not freeze the filesystems; "
                                  "use --consistency auto or crash")
        res.consistency, res.method = s.consistency, s.method
        res.warnings.extend(s.warnings)
        sources = [d for d in s.disks if d.info.target in wanted]
        mode = "incremental" if any(d.incremental for d in sources) else "full"
        ev.phase("read", f"{name}: reading {len(sources)} disk{'s' if len(sources) != 1 else ''}"
                 f" ({mode}, {s.method}, {s.consistency})")
        stats = WriteStats()
        parallel = max(1, min(opts.disk_parallel, len(sources)))
        # disks in parallel share the CPU: split the chunk threads between them, so
        # memory (chunks in flight) stays what one disk would use
        per_disk = max(2, -(-opts.workers // parallel))
        with ThreadPoolExecutor(parallel) as pool:
            futs = [pool.submit(_ingest_disk, repo, d, parent,
                                ev.events.progress(f"{name}/{d.info.target}"), per_disk)
                    for d in sources]
            records = []
            for f in futs:
                rec, st = f.result()
                records.append(rec)
                stats.add(st)
        incremental = any(d.incremental for d in sources)
        cfg = _vm_config(hv, info, res.warnings)
        snap = Snapshot(
            name=name, time=repo.clock(), chunk_size=repo.chunk_size, disks=records,
            tags=list(opts.tags), parent=parent.id if incremental and parent else None,
            meta={"kind": "vm", "uri": hv.uri, "config": cfg, "method": s.method,
                  "consistency": s.consistency, "checkpoint": s.checkpoint,
                  "checkpoint_xml": s.checkpoint_xml,
                  "mode": "incremental" if incremental else "full",
                  "skipped": [{"disk": k, "reason": v} for k, v in _skipped(s)],
                  "warnings": list(res.warnings)},
            stats=stats.as_dict(),
        )
        ev.phase("commit")
        repo.commit_snapshot(snap, stats.reused_ids, hint="run it again with --mode full")
        s.commit()
    res.snapshot = snap.id
    res.mode = "incremental" if incremental else "full"
    res.bytes_read, res.bytes_stored = stats.bytes_read, stats.bytes_stored
    hooks.run("post-backup", snap.id, "ok")


def _skipped(s: BackupJob) -> list[tuple[str, str]]:
    return [(d.target, d.skip_reason or "") for d in s.skipped]


def select_vms(all_names: list[str], patterns: list[str], everything: bool,
               tags: list[str] | None = None,
               vm_tags: dict[str, list[str]] | None = None) -> list[str]:
    """VMs matching any glob in *patterns* (or all), narrowed to those with *tags*."""
    if everything:
        chosen = sorted(all_names)
    else:
        chosen = []
        for p in patterns:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, p)]
            if not hits and not any(ch in p for ch in "*?["):
                hits = [p]  # an exact name: let the backup report DomainNotFound
            chosen.extend(h for h in hits if h not in chosen)
    if tags:
        vt = vm_tags or {}
        chosen = [n for n in chosen if set(tags) <= set(vt.get(n, []))]
    return chosen


def backup_many(
    hv: Hypervisor, repo: Repository, names: list[str], opts_for: Any,
    concurrency: int = 1, events: JobEvents | None = None,
) -> list[VMBackupResult]:
    """Back up *names* in order, at most *concurrency* at once; never raises per VM."""
    if concurrency <= 1 or len(names) <= 1:
        return [backup_vm(hv, repo, n, opts_for(n), events) for n in names]
    with ThreadPoolExecutor(concurrency) as pool:
        futs = [pool.submit(backup_vm, hv, repo, n, opts_for(n), events) for n in names]
        return [f.result() for f in futs]
