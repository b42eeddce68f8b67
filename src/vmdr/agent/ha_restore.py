"""The target host's side of HA without shared storage (:mod:`vmdr.ha.noshared`): carries
out the leader's restore orders addressed to this host.

For each order (``ha/restores/<vm>`` naming this host) the agent:

1. **claims** it (create-if-absent ``ha/restore-claims/<vm>/<id>``) — unless the leader
   already gave it up (claimed it as expired), in which case it never runs it;
2. finds the newest **restore point**: the newest backup snapshot of the VM in its
   repository (``[repositories.NAME]``: URL, password and key files must be readable
   here), and reports ``running`` with it — or ``failed`` with the reason (no restore
   point, repository unreadable);
3. runs ``vmdr instant-restore VM@ID --name VM`` as a child process in its own session
   (the NBD server lives in it, on this host; it survives an agent restart), into the
   host's ``target_dir`` (the inventory's ``[hosts.NAME] target_dir``);
4. reports ``started`` once libvirt here runs the VM, or ``failed`` if the child ends
   before that.

An agent that restarts in the middle finds its claimed order ``running``: the VM running
here → ``started``; the former agent's child still running (the PID in the status, or —
killed before it recorded it — an instant restore of the VM into this host's target
directory found in /proc) → adopted, polled until the VM runs; the child gone with an
instant-restore state file left →
``vmdr instant-restore --resume``; otherwise ``failed``. Every step checks local libvirt
first, so a VM is never started twice here; the leader wrote the order only after no
host ran it and after the fence delay.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmdr.agent.ha_replica import ReplicaUnusable, newest_point, start_from_replica
from vmdr.config import Config, RepositoryRef
from vmdr.ha.noshared import RestorePoint
from vmdr.ha.store import HAStore

__all__ = ["RestoreExecutor", "newest_snapshot", "repository_for"]

log = logging.getLogger("vmdr.ha")
VMDR = [sys.executable, "-m", "vmdr.cli.main"]


class NoRestorePoint(Exception):
    """Why a VM cannot be restored here (the order fails with this reason)."""


def repository_for(cfg: Config, name: str | None) -> RepositoryRef:
    """The ``[repositories.NAME]`` a VM restores from (the only one, if not named)."""
    if name is None:
        if len(cfg.repositories) == 1:
            return next(iter(cfg.repositories.values()))
        raise NoRestorePoint("no ha_repository set and not exactly one [repositories.*] "
                             "declared")
    ref = cfg.repositories.get(name)
    if ref is None:
        raise NoRestorePoint(f"unknown repository {name!r} (no [repositories.{name}])")
    return ref


def newest_snapshot(ref: RepositoryRef, vm: str) -> RestorePoint:
    """The newest VM snapshot of *vm* in *ref* (NoRestorePoint: none, or unreadable)."""
    from vmdr.errors import VmdrError
    from vmdr.repository.opening import OpenOptions, Passphrase, open_repository

    opts = OpenOptions(url=ref.url, passphrase=Passphrase(file=ref.password_file, prompt=None),
                       key_file=ref.key_file)
    try:
        with open_repository(opts, None, "ha restore") as repo:
            snaps = [s for s in repo.list_snapshots(vm, chunks=False)
                     if s.meta.get("kind") == "vm"]
    except VmdrError as exc:
        raise NoRestorePoint(f"repository {ref.name}: {exc.message}") from None
    if not snaps:
        raise NoRestorePoint(f"no backup of {vm} in repository {ref.name}")
    s = snaps[-1]
    return RestorePoint("snapshot", s.id, s.time.timestamp(), ref.name)


def _restore_child(pid: int, vm: str, target_dir: str | None = None) -> bool:
    """Whether *pid* is a live ``vmdr instant-restore`` of *vm* (a former agent's child),
    into *target_dir* if given."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    if target_dir is not None and not any(
            a == b"--target-dir" and b == target_dir.encode()
            for a, b in itertools.pairwise(args)):
        return False
    return b"instant-restore" in args and any(a == vm.encode() or a.startswith(
        vm.encode() + b"@") for a in args)


def _find_child(vm: str, target_dir: str) -> int | None:
    """The PID of a live instant restore of *vm* into *target_dir* (a former agent's
    child whose PID it died before recording), or None."""
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid() and _restore_child(
                int(name), vm, target_dir):
            return int(name)
    return None


class _Orphan:
    """A former agent's instant-restore child, polled by PID (its exit code is not ours:
    1 once it is gone; the VM running here decides success)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if os.path.exists(f"/proc/{self.pid}") else 1


class _Thread:
    """A start from a replica in the background, polled like a child process."""

    def __init__(self, fn: Callable[[], None], name: str) -> None:
        self.error = ""
        self._code: int | None = None

        def run() -> None:
            try:
                fn()
                self._code = 0
            except Exception as exc:
                self.error = str(getattr(exc, "message", exc))[:300]
                log.error("HA replica start failed: %s", self.error)
                self._code = 1

        self._t = threading.Thread(target=run, name=name, daemon=True)
        self._t.start()

    def poll(self) -> int | None:
        return self._code


@dataclass
class RestoreExecutor:
    host: str
    store: HAStore
    cfg: Config
    target_dir: str
    running_here: Callable[[str], bool]  # libvirt here runs this domain now
    log_dir: str
    inv: Any = None  # the inventory (replicas); None: backups only
    resolve: Callable[[dict[str, Any]], RestorePoint] | None = None  # tests: fake points
    spawn: Callable[[list[str], str], Any] | None = None  # tests: no real child
    resolve_replica: Callable[[dict[str, Any]], RestorePoint] | None = None  # tests
    start_replica: Callable[[str, RestorePoint], None] | None = None  # tests
    _procs: dict[str, Any] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)

    def poll(self, now: float) -> None:
        for vm, order in sorted(self.store.restore_orders().items()):
            oid = str(order.get("id"))
            if order.get("host") != self.host or oid in self._done:
                continue
            status = self.store.restore_status(vm, oid) or {}
            if status.get("state") in ("started", "failed"):
                self._done.add(oid)
                continue
            claim = self.store.restore_claim(vm, oid)
            if claim is None:
                if now >= float(order.get("expires", 0)):
                    continue  # the leader gives it up; never run it late
                if not self.store.claim_restore(vm, oid, {"by": self.host, "time": now}):
                    continue  # the leader expired it just now: the next poll sees it
                claim = {"by": self.host}
            if claim.get("by") != self.host or claim.get("expired"):
                self._done.add(oid)
                continue
            try:
                self._drive(vm, order, status, now)
            except Exception as exc:  # never stop the engine; report and let it go
                log.exception("HA restore of %s failed", vm)
                self._status(vm, oid, "failed", now, reason=str(exc)[:300],
                             point=status.get("point"))

    def _status(self, vm: str, oid: str, state: str, now: float, **kw: Any) -> None:
        self.store.put_restore_status(vm, oid, {"state": state, "time": now,
                                                "host": self.host, **kw})
        if state in ("started", "failed"):
            self._done.add(oid)
        log.info("HA restore of %s: %s %s", vm, state, kw.get("reason", ""))

    def _drive(self, vm: str, order: dict[str, Any], status: dict[str, Any],
               now: float) -> None:
        oid = str(order["id"])
        if self.running_here(vm):
            self._status(vm, oid, "started", now, point=status.get("point"),
                         note=status.get("note", ""))
            return
        if not status:  # claimed, not run yet
            point, note = self._replica_point(order)
            if point is None:
                try:
                    point = (self.resolve or self._newest)(order)
                except NoRestorePoint as exc:
                    self._status(vm, oid, "failed", now, note=note,
                                 reason=f"no restore point: {exc}")
                    return
            self._status(vm, oid, "running", now, point=point.as_dict(), note=note)
            proc = self._start(vm, order, point)
            self._procs[oid] = proc
            pid = getattr(proc, "pid", None)
            if isinstance(pid, int):  # an agent restarted later adopts the live child
                self._status(vm, oid, "running", now, point=point.as_dict(), note=note,
                             pid=pid)
            return
        proc = self._procs.get(oid)
        if proc is None and status.get("point", {}).get("kind") == "replica":
            # restarted mid-start: nothing runs here (checked above), nothing elsewhere
            # (the leader's check before the order): start it again, idempotently
            self._procs[oid] = self._start(vm, order, RestorePoint.from_dict(status["point"]))
            return
        if proc is None:  # this agent restarted while the restore ran
            pid = status.get("pid")
            if not (isinstance(pid, int) and _restore_child(pid, vm)):
                # killed between the spawn and the status naming its PID: find it
                pid = _find_child(vm, self.target_dir)
                if pid is not None:
                    self._status(vm, oid, "running", now, point=status.get("point"),
                                 note=status.get("note", ""), pid=pid)
            if pid is not None:
                self._procs[oid] = _Orphan(pid)  # still serving: never a second server
                log.info("HA restore of %s: adopted the running child %d", vm, pid)
                return
            if os.path.exists(self._state_file(vm)):
                point = RestorePoint.from_dict(status["point"])
                self._procs[oid] = self._run(vm, order, point, resume=True)
            else:
                self._status(vm, oid, "failed", now, point=status.get("point"),
                             reason="the restore process is gone and left no state")
            return
        code = proc.poll()
        if code is not None and not self.running_here(vm):
            why = (f"the start from the replica failed: {proc.error}"
                   if isinstance(proc, _Thread) else
                   f"instant restore exited with {code}: {self._tail(vm)}")
            self._status(vm, oid, "failed", now, point=status.get("point"), reason=why)

    def _replica_point(self, order: dict[str, Any]) -> tuple[RestorePoint | None, str]:
        """The replica's newest point when the order says the VM was placed on its
        replica's host; else (None, why the replica is not used or "")."""
        if not order.get("replica"):
            return None, ""
        try:
            if self.resolve_replica is not None:
                return self.resolve_replica(order), ""
            if self.inv is None:
                return None, "replica not used: no inventory"
            return newest_point(self.cfg, self.inv, str(order["vm"]), self.host), ""
        except ReplicaUnusable as exc:
            log.warning("HA restore of %s: replica not used (%s); from the backup",
                        order["vm"], exc)
            return None, f"replica not used: {exc}"

    def _start(self, vm: str, order: dict[str, Any], point: RestorePoint) -> Any:
        if point.kind != "replica":
            return self._run(vm, order, point, resume=False)
        return _Thread(lambda: (self.start_replica or self._from_replica)(vm, point),
                       f"ha-replica-{vm}")

    def _from_replica(self, vm: str, point: RestorePoint) -> None:
        log.warning("HA: starting %s here from its replica point %s", vm, point.id)
        start_from_replica(self.cfg, self.inv, vm, self.host, point.id)

    def _newest(self, order: dict[str, Any]) -> RestorePoint:
        ref = repository_for(self.cfg, order.get("repository"))
        return newest_snapshot(ref, str(order["vm"]))

    def _state_file(self, vm: str) -> str:
        from vmdr.jobs.instant import state_file

        return state_file(self.target_dir, vm)

    def _log(self, vm: str) -> str:
        return os.path.join(self.log_dir, f"ha-restore-{vm}.log")

    def _tail(self, vm: str) -> str:
        try:
            with open(self._log(vm), encoding="utf-8", errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        except OSError:
            return "no log"
        errs = [ln for ln in lines if ln.startswith("vmdr: error")]
        return (errs or lines or ["no output"])[-1][:300]

    def _run(self, vm: str, order: dict[str, Any], point: RestorePoint,
             resume: bool) -> Any:
        ref = repository_for(self.cfg, order.get("repository"))
        argv = [*VMDR, "instant-restore", "--no-progress", "--repo", ref.url]
        if self.cfg.path:
            argv += ["--config", self.cfg.path]
        if ref.password_file:
            argv += ["--password-file", ref.password_file]
        if ref.key_file:
            argv += ["--key-file", ref.key_file]
        argv += ["--target-dir", self.target_dir,
                 "--connect", self.cfg.connect]
        argv += [vm, "--resume"] if resume else [f"{vm}@{point.id}", "--name", vm]
        log.warning("HA: restoring %s here from %s (%s)", vm, point.label,
                    "resume" if resume else "instant restore")
        if self.spawn is not None:
            return self.spawn(argv, self._log(vm))
        os.makedirs(self.log_dir, exist_ok=True)
        with open(self._log(vm), "ab") as out:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)


def preview(cfg: Config, inv: Any, policy: Any, targets: dict[str, str | None],
            now: float) -> list[dict[str, Any]]:
    """For ``vmdr ha simulate`` / ``status``: how each local-storage HA VM would restart
    if its host failed *now*: the restore point (replica or snapshot) and the data that
    would be lost, or why it could not. *targets*: VM → the host placement picked."""
    from vmdr.ha.noshared import choose, describe, lost_s

    out: list[dict[str, Any]] = []
    snaps: dict[str, tuple[RestorePoint | None, str]] = {}
    for vm in sorted(targets):
        rule = policy.vms.get(vm)
        if rule is None or not rule.local:
            continue
        target = targets[vm]
        row: dict[str, Any] = {"vm": vm, "to": target, "restore": None, "point": None,
                               "lost_s": None, "reason": ""}
        if target is None:
            row["reason"] = "cannot be placed"
            out.append(row)
            continue
        if vm not in snaps:
            try:
                snaps[vm] = (newest_snapshot(repository_for(cfg, rule.repository), vm), "")
            except NoRestorePoint as exc:
                snaps[vm] = (None, str(exc))
        snap, snap_why = snaps[vm]
        rep: RestorePoint | None = None
        rep_why = ""
        if rule.replica_host == target:
            h = inv.hosts.get(target)
            try:
                rep = newest_point(cfg, inv, vm, target, h.uri if h else None)
            except ReplicaUnusable as exc:
                rep_why = f"replica on {target} not readable from here: {exc}"
        point, why = choose(rule, target, rep, snap)
        if point is None:
            parts = [rep_why or why.removeprefix("no restore point: ").split("; ")[0]
                     if rule.replica_host else "", snap_why]
            row["reason"] = "no restore point: " + "; ".join(x for x in parts if x)
        elif rep_why:
            row["note"] = rep_why
        else:
            row.update(restore=point.kind, point=point.as_dict(),
                       lost_s=lost_s(now, point), reason=describe(point, now))
        out.append(row)
    return out


def preview_line(row: dict[str, Any]) -> str:
    """One line of :func:`preview`."""
    if row["point"] is None:
        return f"  {row['vm']}: local disks, cannot restart: {row['reason']}"
    return (f"  {row['vm']}: local disks, restarts on {row['to']} from {row['reason']} "
            "if its host failed now")
