"""``vmdr instant-restore``: boot a VM straight from the repository, then move its disks home.

1. Serve the snapshot's disks over NBD (``vmdr.serve``, unix sockets in
   ``/run/vmdr/instant/<name>/`` owned by the QEMU user).
2. Create local qcow2 overlays backed by the exports (``-F raw -b nbd+unix://…``), define a
   persistent domain on them (new name, UUID, MACs; console log moved; disks with
   ``error_policy``/``rerror_policy`` ``stop``) and boot it; wait for the heartbeat.
3. Copy every disk in full (flattening the NBD backing) to a local qcow2 with libvirt block
   copy, and pivot onto it when the copy is in sync. Then the domain no longer needs the
   repository: the server stops and the overlays are deleted.

The final name ``<name>-<disk>.qcow2`` never holds a partial copy, even after ``kill -9``:
the copy goes to a hidden name in the same directory, ``.<name>-<disk>.qcow2.<random>
.vmdr-instant`` (recorded in the state file; not a ``.vmdr-partial`` name, so the restore
sweeper never removes it under a running VM). Only once the copy is in sync, pivoted and
fsynced does the final name appear, as a hard link to the same file (``os.link`` + fsync of
the directory), and the persistent definition is pointed at it. The running QEMU keeps the
hidden path in its live XML (libvirt may reopen a disk by path, e.g. for an external
snapshot), so that link stays while the VM runs on it; the state file stays too, marked
``moved``, and ``--resume`` after the VM's next cold start (or shutdown) removes the hidden
link — only when no live XML names it and it is the same inode as the final name — and the
state file. A hidden copy left by a killed run is deleted and copied again by ``--resume``.

The NBD server lives in this process, so the command runs until step 3 ends. A state file
``<target-dir>/<name>.instant.json`` describes an unfinished migration. If anything stops
it (Ctrl-C, the repository unreachable, a failed copy) the VM is paused — a guest whose
backing is gone would pause on its next read anyway — and ``--resume`` restarts the server
on the same sockets (killing a dead run's nbdkit still on them, see
:func:`vmdr.serve.server.reap_orphans`), waits until QEMU's NBD clients are connected to it
(:func:`_await_nbd`), resumes (or starts) the VM and finishes the copy.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from vmdr.diskio.images import fsync_dir
from vmdr.errors import (
    DomainNotFound,
    HeartbeatTimeout,
    HypervisorUnsupported,
    InstantInterrupted,
    MigrationStopped,
    UsageError,
    VmdrError,
)
from vmdr.events import ItemProgress, JobEvents
from vmdr.hypervisor import Domain, Hypervisor, mirror, rewrite_domain_xml
from vmdr.hypervisor.console import console_log, relocate_console_logs
from vmdr.hypervisor.state import blocking_ancestor, qemu_user
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository

DEFAULT_DIR = "/var/lib/libvirt/images"
SOCKET_ROOT = "/run/vmdr/instant"
STATE_VERSION = 1
COPY_RETRIES = 3
# QEMU's NBD connect thread retries after 1, 2, 4, 8, then every 16 s: after an outage the
# next attempt can be 16 s away
RECONNECT_TIMEOUT = 60.0
TEMP_SUFFIX = ".vmdr-instant"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$")


@dataclass
class InstantOptions:
    name: str
    target_dir: str = DEFAULT_DIR
    heartbeat: str | None = None  # None/"agent": guest-agent ping; else a console regex
    timeout: float = 300.0
    bandwidth: int | None = None  # bytes/s per disk copy; None: unlimited
    keep_overlays: bool = False
    poll: float = 0.5


def state_file(target_dir: str, name: str) -> str:
    return os.path.join(os.path.abspath(target_dir), f"{name}.instant.json")


def _write_state(st: dict[str, Any]) -> None:
    tmp = st["state_file"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(st, f, indent=1)
    os.replace(tmp, st["state_file"])


def _resume_hint(st: dict[str, Any]) -> str:
    return (f"run 'vmdr instant-restore --resume {st['vm']} --target-dir {st['target_dir']}' "
            "(same repository) to continue, or 'virsh destroy "
            f"{st['vm']}; virsh undefine {st['vm']}' and delete {st['target_dir']}/"
            f"{st['vm']}* and .{st['vm']}-*{TEMP_SUFFIX} to discard it")


def temp_name(target: str) -> str:
    """The hidden name a disk is copied to before it may appear as *target*."""
    d, base = os.path.split(target)
    return os.path.join(d, f".{base}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _temp(st: dict[str, Any], disk: str) -> str:
    info = st["disks"][disk]
    if not info.get("temp"):  # a state file written before hidden copies
        info["temp"] = temp_name(info["target"])
        if "state_file" in st:
            _write_state(st)
    return str(info["temp"])


def _serve(repo: Repository, snap: Snapshot, st: dict[str, Any], hv: Hypervisor) -> Any:
    from vmdr.serve import start_server

    sock_dir = st["socket_dir"]
    for d in (os.path.dirname(SOCKET_ROOT), SOCKET_ROOT, sock_dir):
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)  # noqa: S103 - QEMU must traverse to the (0660) sockets
    server = start_server(repo, snap, disks=sorted(st["disks"]), socket_dir=sock_dir,
                          socket_owner=qemu_user() if hv.system else None)
    for disk, info in st["disks"].items():
        if info.get("uri") and server.exports[disk] != info["uri"]:
            server.stop()
            raise VmdrError(f"the NBD export of {disk} moved ({server.exports[disk]}); "
                            "the overlays cannot reach it")
        info["uri"] = server.exports[disk]
    return server


def _create_overlay(path: str, uri: str, size: int) -> None:
    p = subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b",
                        uri, path, str(size)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise VmdrError(f"cannot create overlay {path}: {p.stderr.strip()[-300:]}")
    os.chmod(path, 0o600)


def _plan(snap: Snapshot, opts: InstantOptions, hv: Hypervisor) -> dict[str, Any]:
    if snap.meta.get("kind") != "vm":
        raise UsageError(f"{snap.name}@{snap.short_id} is an image snapshot, not a VM")
    if not _NAME_RE.match(opts.name):
        raise UsageError(f"invalid VM name {opts.name!r}")
    if not hv.local:
        raise UsageError("instant recovery needs a local libvirt (the NBD server runs on "
                         f"this host), not {hv.uri}")
    if not snap.disks:
        raise UsageError(f"snapshot {snap.short_id} has no disks")
    try:
        hv.domain(opts.name)
        raise UsageError(f"a domain named {opts.name!r} exists on {hv.uri}; pick another --name")
    except DomainNotFound:
        pass
    target_dir = os.path.abspath(opts.target_dir)
    os.makedirs(target_dir, exist_ok=True)
    user = qemu_user() if hv.system else None
    blocked = blocking_ancestor(target_dir, user) if user else None
    if blocked:
        raise UsageError(f"{user} cannot reach {target_dir} ({blocked} is closed to it); "
                         "pick another --target-dir")
    disks = {}
    for d in snap.disks:
        base = os.path.join(target_dir, f"{opts.name}-{d.name}")
        disks[d.name] = {"overlay": base + ".overlay.qcow2", "target": base + ".qcow2",
                         "temp": temp_name(base + ".qcow2"), "size": d.size, "uri": None}
    st: dict[str, Any] = {
        "version": STATE_VERSION, "vm": opts.name, "snapshot": snap.id, "source": snap.name,
        "target_dir": target_dir, "socket_dir": os.path.join(SOCKET_ROOT, opts.name),
        "disks": disks, "state_file": state_file(target_dir, opts.name)}
    for p in [st["state_file"]] + [p for i in disks.values() for p in (i["overlay"],
                                                                       i["target"])]:
        if os.path.exists(p):
            raise UsageError(f"{p} exists; remove it or pick another --name")
    return st


def _domain_xml(snap: Snapshot, st: dict[str, Any]) -> str:
    cfg = snap.meta.get("config") or {}
    if not cfg.get("domain_xml"):
        raise UsageError(f"snapshot {snap.short_id} has no domain XML")
    nvram = None
    if cfg.get("nvram"):
        nvram = os.path.join(st["target_dir"], f"{st['vm']}_VARS.fd")
        with open(nvram, "wb") as f:
            f.write(base64.b64decode(cfg["nvram"]))
        st["nvram"] = nvram
    xml = rewrite_domain_xml(
        cfg["domain_xml"], new_name=st["vm"] if st["vm"] != snap.name else None,
        new_uuid=True, new_macs=True,
        disk_paths={d: (i["overlay"], "qcow2") for d, i in st["disks"].items()},
        nvram_path=nvram)
    xml = relocate_console_logs(xml, st["target_dir"], st["vm"])
    st["policies"] = mirror.error_policies(xml, st["disks"])
    return mirror.set_error_policy(xml, st["disks"])


def _serving(ev: JobEvents, st: dict[str, Any]) -> None:
    ev.phase("serve", f"serving snapshot {st['snapshot'][:8]} over NBD", st["vm"],
             {"exports": {d: i["uri"] for d, i in st["disks"].items()}})


def instant_restore(repo: Repository, snap: Snapshot, opts: InstantOptions, hv: Hypervisor,
                    events: JobEvents | None = None) -> dict[str, Any]:
    ev = events or JobEvents()
    t0 = time.monotonic()
    st = _plan(snap, opts, hv)
    created: list[str] = []
    server: Any = None
    defined = False
    try:
        server = _serve(repo, snap, st, hv)
        _serving(ev, st)
        for info in st["disks"].values():
            _create_overlay(info["overlay"], info["uri"], info["size"])
            created.append(info["overlay"])
        xml = _domain_xml(snap, st)
        st["heartbeat"] = opts.heartbeat
        st["console_log"] = console_log(xml)
        _write_state(st)
        created.append(st["state_file"])
        hv.define(xml)
        defined = True
        hv.start(st["vm"])
    except BaseException:
        if server is not None:
            server.stop()
        _remove_socket_dir(st)
        if defined:
            _discard_domain(hv, st["vm"])
        for p in created + ([st["nvram"]] if st.get("nvram") else []) + \
                [st["state_file"] + ".tmp"]:
            _unlink(p)
        raise
    ev.phase("boot", f"{st['vm']} started on overlays after "
             f"{time.monotonic() - t0:.1f}s", st["vm"])
    return _run(st, opts, hv, ev, server, t0, boot=True)


def instant_resume(repo: Repository, name: str, opts: InstantOptions, hv: Hypervisor,
                   events: JobEvents | None = None) -> dict[str, Any]:
    ev = events or JobEvents()
    t0 = time.monotonic()
    path = state_file(opts.target_dir, name)
    try:
        with open(path, encoding="utf-8") as f:
            st: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"no unfinished instant restore of {name!r} in {opts.target_dir} "
                         f"({path} is missing)") from None
    except ValueError:
        raise VmdrError(f"{path} is not an instant-restore state file") from None
    if st.get("version") != STATE_VERSION:
        raise VmdrError(f"{path}: unknown state version {st.get('version')}")
    if st.get("moved"):  # only hidden names of the moved disks are left to remove
        hidden = _tidy(hv, st)
        return {"vm": name, "snapshot": st["snapshot"], "target_dir": st["target_dir"],
                "heartbeat_s": None, "hidden": hidden,
                "disks": {d: i["target"] for d, i in st["disks"].items()},
                "duration_s": round(time.monotonic() - t0, 3)}
    snap = repo.load_snapshot(st["snapshot"])
    dom = hv.lookup(name)
    server = _serve(repo, snap, st, hv)
    _serving(ev, st)
    boot = False
    try:
        if dom.is_active():  # a killed run's copies still read the dead export: drop them
            for d in st["disks"]:
                dom.block_job(d).cancel()
            # QEMU's NBD clients still hold the old connections: before the guest or a
            # copy needs them, make each reconnect to the new server
            _await_nbd(dom, server, mirror.nbd_backed_disks(dom.xml()))
        if not dom.is_active():
            dom.start()
            boot = True
        elif dom.state() == "paused":
            dom.resume_after_io_error()
            ev.phase("migrate", f"{name} resumed", name)
    except KeyboardInterrupt:
        where = _stop_safely(hv, st, server)
        raise InstantInterrupted(f"interrupted; {name} {where}: {_resume_hint(st)}") from None
    except VmdrError as exc:
        where = _stop_safely(hv, st, server)
        raise MigrationStopped(f"{exc.message}; {name} {where}: {_resume_hint(st)}") from None
    return _run(st, opts, hv, ev, server, t0, boot=boot)


def _run(st: dict[str, Any], opts: InstantOptions, hv: Hypervisor,
         ev: JobEvents, server: Any, t0: float, boot: bool) -> dict[str, Any]:
    """Heartbeat (after a boot), then migrate; any failure leaves the VM paused-safe.

    The caller holds a shared repository lock for the whole run (prune must not delete
    chunks that are being served)."""
    result: dict[str, Any] = {"vm": st["vm"], "snapshot": st["snapshot"],
                              "target_dir": st["target_dir"], "heartbeat_s": None}
    try:
        if boot:
            result["heartbeat_s"] = _heartbeat(hv, st, opts, ev, t0)
        _migrate(hv.lookup(st["vm"]), st, opts, ev, server)
    except KeyboardInterrupt:
        where = _stop_safely(hv, st, server)
        raise InstantInterrupted(f"interrupted; {st['vm']} {where}: {_resume_hint(st)}") \
            from None
    except VmdrError as exc:
        where = _stop_safely(hv, st, server)
        raise MigrationStopped(f"{exc.message}; {st['vm']} {where}: {_resume_hint(st)}") \
            from None
    except BaseException:
        _stop_safely(hv, st, server)
        raise
    result["migrated_s"] = round(time.monotonic() - t0, 3)
    result["hidden"] = _finish(hv, st, opts, server, ev)
    result["disks"] = {d: i["target"] for d, i in st["disks"].items()}
    result["duration_s"] = round(time.monotonic() - t0, 3)
    return result


def _heartbeat(hv: Hypervisor, st: dict[str, Any], opts: InstantOptions, ev: JobEvents,
               t0: float) -> float | None:
    agent = opts.heartbeat in (None, "agent")
    try:
        hv.wait_heartbeat(st["vm"], agent=agent,
                          console_pattern=None if agent else opts.heartbeat,
                          console_log=None if agent else st.get("console_log"),
                          timeout=opts.timeout)
    except HeartbeatTimeout as exc:
        ev.warning(f"{exc.message}; moving the disks anyway", st["vm"])
        return None
    seconds = round(time.monotonic() - t0, 3)
    ev.phase("migrate", f"{st['vm']} is up: heartbeat after {seconds:.1f}s", st["vm"],
             {"heartbeat_s": seconds})
    return seconds


def _await_nbd(dom: Domain, server: Any, disks: list[str],
               timeout: float = RECONNECT_TIMEOUT, poll: float = 0.2) -> None:
    """Wait until QEMU's NBD client of each of *disks* is connected to our server.

    QEMU's client notices a lost server only when a request fails; it then fails requests
    (a block copy's first read ends the copy) until the connect thread that failure started
    got through — backing off to 16 s between attempts — and takes the new connection on
    the next request. So read through the client until the server sees it connected, then
    once more: that read takes the connection."""
    pending = [d for d in disks if server.sockets.get(d)]
    deadline = time.monotonic() + timeout
    while pending:
        for d in list(pending):
            connected = server.clients(d) > 0
            try:
                found = dom.nbd_read(server.sockets[d])
            except HypervisorUnsupported:
                return
            if connected or not found:
                pending.remove(d)
        if not pending:
            return
        if not server.alive():
            raise VmdrError("the NBD server stopped")
        if time.monotonic() > deadline:
            raise VmdrError(f"QEMU's NBD client of {', '.join(pending)} did not reconnect to "
                            f"the export within {timeout:.0f}s (the repository is "
                            "unreachable?)")
        time.sleep(poll)


def _start_copy(dom: Domain, st: dict[str, Any], disk: str, opts: InstantOptions,
                ev: JobEvents) -> ItemProgress:
    info = st["disks"][disk]
    legacy = not info.get("temp")
    temp = _temp(st, disk)
    dom.block_job(disk).cancel()
    if legacy:
        _unlink(info["target"])  # a partial copy an older vmdr left under the final name
    elif os.path.lexists(info["target"]):
        raise VmdrError(f"{info['target']} appeared while {disk} was still being copied; "
                        "move it away, then --resume")
    _unlink(temp)  # a copy a stopped run left behind
    dom.block_copy(disk, temp, bandwidth=opts.bandwidth)
    ev.phase("copy", f"copying {disk} to {info['target']}", f"{st['vm']}/{disk}")
    return ev.progress(f"{st['vm']}/{disk}")


def _migrate(dom: Domain, st: dict[str, Any], opts: InstantOptions, ev: JobEvents,
             server: Any) -> None:
    """Copy every disk still backed by NBD and pivot onto the copy. A copy that fails is
    restarted, once QEMU reads the disk through the server again, up to ``COPY_RETRIES``
    times; the VM pausing on an I/O error stops everything."""
    pending = [d for d in sorted(st["disks"]) if d in mirror.nbd_backed_disks(dom.xml())]
    retries = dict.fromkeys(pending, COPY_RETRIES)
    progress = {d: _start_copy(dom, st, d, opts, ev) for d in pending}
    while pending:
        if not dom.is_active():
            raise VmdrError(f"{st['vm']} stopped while its disks were being moved")
        if dom.paused_on_io_error():
            raise VmdrError(f"{st['vm']} paused on an I/O error: the repository (NBD "
                            "export) is unreachable")
        if not server.alive():
            raise VmdrError("the NBD server stopped")
        for d in list(pending):
            job = dom.block_job(d)
            cs = job.status()
            if not cs.active:
                if d not in mirror.nbd_backed_disks(dom.xml()):
                    pending.remove(d)  # pivoted by someone else
                    progress[d].finish()
                    continue
                if retries[d] <= 0:
                    raise VmdrError(f"copying disk {d} failed (reading the repository "
                                    "failed?)")
                retries[d] -= 1
                ev.warning(f"copy of {d} failed; restarting it", st["vm"])
                _await_nbd(dom, server, [d])
                progress[d] = _start_copy(dom, st, d, opts, ev)
                continue
            progress[d].update(cs.cur, cs.end)
            if cs.ready and job.pivot():
                pending.remove(d)
                progress[d].finish()
                _publish(dom, st, d)
                ev.phase("pivot", f"{d} now runs on {st['disks'][d]['target']}",
                         f"{st['vm']}/{d}")
        if pending:
            time.sleep(opts.poll)
    for d in sorted(st["disks"]):  # pivoted by a run killed before it named the copy
        _publish(dom, st, d)


def _publish(dom: Domain, st: dict[str, Any], disk: str) -> None:
    """Give a pivoted copy its final name: fsync it, hard-link the final name to it and
    fsync the directory. Nothing to do unless the domain runs on the hidden copy."""
    info = st["disks"][disk]
    temp, target = info.get("temp"), info["target"]
    if not temp or mirror.disk_sources(dom.xml()).get(disk) != temp:
        return
    try:
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, target)
        except FileExistsError:
            if not os.path.samefile(temp, target):
                raise VmdrError(f"{target} exists and is not the copy of {disk} ({temp}); "
                                "move it away, then --resume") from None
        fsync_dir(os.path.dirname(target))
    except OSError as exc:
        raise VmdrError(f"cannot name the copy of {disk} {target}: "
                        f"{exc.strerror or exc}") from None


def _finish(hv: Hypervisor, st: dict[str, Any], opts: InstantOptions, server: Any,
            ev: JobEvents) -> list[str]:
    """Stop serving, point the persistent domain at the final names, drop the overlays.
    The hidden copy names the running VM still uses (kept, with the state file)."""
    dom = hv.lookup(st["vm"])
    live = dom.xml()
    persistent = dom.xml(inactive=True)
    left = set(mirror.nbd_backed_disks(live)) | set(mirror.nbd_backed_disks(persistent))
    if left:
        raise VmdrError(f"disks {', '.join(sorted(left))} still read from the repository")
    server.stop()
    _remove_socket_dir(st)
    # the persistent definition: the final names, and the VM's own error policies
    persistent = dom.xml(inactive=True, secure=True)
    on_temp = mirror.disk_sources(persistent)
    paths = {d: (i["target"], "qcow2") for d, i in st["disks"].items()
             if i.get("temp") and on_temp.get(d) == i["temp"]}
    if paths or st.get("policies"):
        xml = rewrite_domain_xml(persistent, new_uuid=False, new_macs=False,
                                 disk_paths=paths) if paths else persistent
        try:
            hv.define(mirror.with_error_policies(xml, st.get("policies") or {}))
        except VmdrError as exc:
            ev.warning("could not redefine the domain on its final disk names (it boots "
                       f"from the hidden copies; error policies stay 'stop'): {exc.message}",
                       st["vm"])
    if not opts.keep_overlays:
        for info in st["disks"].values():
            _unlink(info["overlay"])
    st["moved"] = True
    return _tidy(hv, st)


def _tidy(hv: Hypervisor, st: dict[str, Any]) -> list[str]:
    """Remove the hidden names of moved disks that the domain no longer uses (neither its
    live nor its persistent XML names them) and whose final name is the same file; the
    state file goes with the last of them. The hidden names left."""
    try:
        dom = hv.lookup(st["vm"])
        used = set(mirror.disk_sources(dom.xml()).values()) | set(
            mirror.disk_sources(dom.xml(inactive=True)).values())
    except DomainNotFound:
        used = set()
    left = []
    for info in st["disks"].values():
        temp = info.get("temp")
        if not temp or not os.path.lexists(temp):
            continue
        try:
            same = os.path.samefile(temp, info["target"])
        except OSError:
            same = False
        if temp in used or not same:
            left.append(temp)
            continue
        _unlink(temp)
        fsync_dir(os.path.dirname(temp))
    if left:
        _write_state(st)
    else:
        _unlink(st["state_file"])
        _unlink(st["state_file"] + ".tmp")  # a write a killed run did not finish
    return left


def _stop_safely(hv: Hypervisor, st: dict[str, Any], server: Any) -> str:
    """Cancel copies and pause the VM before its backing goes away; keep the state file.
    Returns where the VM is now, for the message."""
    where = "is paused on its overlays (no data lost)"
    try:
        dom = hv.lookup(st["vm"])
        for d in st["disks"]:
            dom.block_job(d).cancel()
        dom.suspend()
        if not dom.is_active():
            where = "is shut off, defined on its overlays"
    except VmdrError:
        where = "may be paused"
    finally:
        server.stop()
        _remove_socket_dir(st)
    return where


def _discard_domain(hv: Hypervisor, name: str) -> None:
    for op in (hv.destroy, hv.undefine):
        try:
            op(name)
        except VmdrError:
            pass


def _remove_socket_dir(st: dict[str, Any]) -> None:
    try:
        os.rmdir(st["socket_dir"])
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
