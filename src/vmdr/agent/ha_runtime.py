"""The agent's HA part (fleet mode with ``[agent] etcd``, an ``[ha]`` table and HA VMs).

Two threads beside the agent's loop, so a renewal stuck on an unreachable etcd delays
neither:

* **guard** (every 0.1 s): follows the coordinator's last successful lease renewal
  (:class:`vmdr.ha.fencing.SelfFence`); once ``lease_ttl − self_fence_margin`` has passed
  without one, destroys every HA VM running on this host — before etcd can expire the
  lease and the leader restart them elsewhere. Pets ``/dev/watchdog`` after each renewal
  where the device exists.
* **engine** (every 0.25 s): publishes the domain XML and host of the HA VMs running here
  (``ha/domains``, ``ha/where``, on change only); reports a fencing episode once etcd
  answers again; and, while this agent leads and holds its lease, runs the failover
  executor (:class:`vmdr.ha.leader.HALeader`). A dead local libvirtd is no host failure
  (its QEMUs run on, the lease is renewed): one ``detected`` event when it stops and one
  when it answers again; the engine goes on meanwhile. Meanwhile the agent's member key
  carries ``libvirt_ok = false``, ``libvirt_down`` (since when) and ``libvirt_error``:
  the leader, ``ha status``, ``ha simulate`` and admission control take no host with it
  as a target.

Libvirt access to the other hosts goes through their inventory URIs (``[hosts.NAME]
uri``); this host uses the config's ``connect``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vmdr.agent.clock import wall
from vmdr.agent.coord_etcd import EtcdCoordinator
from vmdr.agent.ha_restore import RestoreExecutor
from vmdr.config import Config
from vmdr.errors import ConfigError, DomainNotFound, GuestAgentUnavailable
from vmdr.ha import admission
from vmdr.ha.fencing import SelfFence, Watchdog
from vmdr.ha.leader import HALeader, LiveHost
from vmdr.ha.model import HAPolicy, load_policy, state_from_inventory
from vmdr.ha.qemukill import SYSTEM_RUN_DIR, kill_by_pidfile
from vmdr.ha.store import HAStore
from vmdr.hypervisor import Hypervisor
from vmdr.plan import inventory

__all__ = ["HARuntime", "LibvirtOps", "make_ha_runtime"]

log = logging.getLogger("vmdr.ha")
GUARD_PERIOD = 0.1
ENGINE_PERIOD = 0.25
PUBLISH_EVERY = 2.0
CHECK_TIMEOUT = 1.5  # s for "is it running there?" per host (unreachable: skipped)
READY_TIMEOUT = 3.0  # s for one readiness check (a host that hangs: not ready yet)
START_TIMEOUT = 30.0  # s for define + start on a live target
LOCAL_TIMEOUT = 5.0  # s for this host's own libvirt (a hung libvirtd: reported as down)
WATCHDOG = "/dev/watchdog"


def _in_thread(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """(finished, result) of *fn* run in a daemon thread for at most *timeout* seconds
    (a partitioned host's libvirt connect can hang for minutes)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        return False, None
    return True, box[0]


class LibvirtOps:
    """:class:`vmdr.ha.leader.FleetOps` over hypervisor connections by URI."""

    def __init__(self, uris: dict[str, str], connect: Callable[[str], Hypervisor]) -> None:
        self.uris = uris
        self.connect = connect
        self._conns: dict[str, Hypervisor] = {}
        self._lock = threading.Lock()

    def _conn(self, host: str) -> Hypervisor:
        with self._lock:
            c = self._conns.get(host)
        if c is None:
            c = self.connect(self.uris[host])
            with self._lock:
                self._conns[host] = c
        return c

    def _drop(self, host: str) -> None:
        """Forget the connection; close it in the background (closing a connection to a
        host that stopped answering can hang too)."""
        with self._lock:
            c = self._conns.pop(host, None)
        if c is not None:
            threading.Thread(target=lambda: _in_thread(c.close, 30), daemon=True).start()

    def _running_on(self, host: str, vm: str) -> bool:
        hv = self.connect(self.uris[host])  # fresh: this runs in a throw-away thread
        try:
            if vm not in hv.list_domains():
                return False
            return hv.lookup(vm).is_active()
        finally:
            hv.close()

    def where_running(self, vm: str) -> list[str]:
        results: dict[str, tuple[bool, Any]] = {}
        threads = []
        for host in sorted(self.uris):
            def check(h: str = host) -> None:
                results[h] = _in_thread(lambda: self._running_on(h, vm), CHECK_TIMEOUT)
            t = threading.Thread(target=check, daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(CHECK_TIMEOUT + 0.5)
        return sorted(h for h, (done, r) in results.items() if done and r is True)

    def start(self, host: str, xml: str) -> None:
        """Define and start; a cached connection that fails (libvirt's keepalive closed it
        while the hosts were cut off) is replaced and the start tried once more on a
        fresh one. Same host, same name: libvirt never runs a second copy there."""
        def run() -> None:
            hv = self._conn(host)
            dom = hv.lookup(hv.define(xml))
            if not dom.is_active():
                dom.start()

        for attempt in (1, 2):
            cached = host in self._conns
            done, r = _in_thread(run, START_TIMEOUT)
            if done and not isinstance(r, Exception):
                return
            self._drop(host)
            if not done:  # may still be starting: the leader re-checks before any retry
                raise TimeoutError(f"no answer from {host}'s libvirt within "
                                   f"{START_TIMEOUT:g}s")
            if attempt == 2 or not cached:
                raise r
            log.info("start on %s: the cached connection failed (%s); reconnecting", host, r)

    def ready(self, host: str, vm: str, check: str) -> bool:
        """Never blocks the leader for long: a host that stopped answering (partitioned
        after the start) counts as not ready, and its connection is dropped."""
        done, r = _in_thread(lambda: self._ready(host, vm, check), READY_TIMEOUT)
        if not done:
            self._drop(host)
            return False
        return r is True

    def _ready(self, host: str, vm: str, check: str) -> bool:
        if check == "none":
            return True
        try:
            dom = self._conn(host).lookup(vm)
            if check == "agent":
                return bool(dom.guest_ping(timeout=1))
            if check.startswith("exec:"):
                return dom.guest_exec(shlex.split(check[5:]), timeout=5).ok
            if check.startswith("tcp:"):
                port = int(check[4:])
                for addr in dom.guest_addresses():
                    try:
                        with socket.create_connection((addr, port), timeout=1):
                            return True
                    except OSError:
                        continue
            return False
        except (GuestAgentUnavailable, DomainNotFound) as exc:
            log.debug("readiness of %s on %s: %s", vm, host, exc)
            return False
        except Exception as exc:  # the connection itself: the next check reconnects
            log.debug("readiness of %s on %s: %s; reconnecting", vm, host, exc)
            self._drop(host)
            return False

    def local_ha_running(self, host: str, names: set[str]) -> list[str]:
        hv = self._conn(host)
        out = []
        for n in hv.list_domains():
            if n in names and hv.lookup(n).is_active():
                out.append(n)
        return out


class HARuntime:
    def __init__(self, host: str, policy: HAPolicy, coord: EtcdCoordinator, store: HAStore,
                 ops: LibvirtOps, *, clock: Callable[[], float] = wall,
                 watchdog: str | None = WATCHDOG, reader: Any = None,
                 restorer: RestoreExecutor | None = None) -> None:
        self.host = host
        # libvirt's QEMU pid files, for self-fencing when libvirt does not answer
        uri = getattr(ops, "uris", {}).get(host, "")
        self.qemu_run_dir = SYSTEM_RUN_DIR if uri == "qemu:///system" else ""
        # member reads go through a client of their own: an error there must never reset
        # the lease object of the coordinator that renews it (the leader key hangs on it)
        self.reader = reader if reader is not None else coord
        self.policy = policy
        self.settings = policy.settings
        self.coord = coord
        self.store = store
        self.ops = ops
        self.clock = clock
        self.fence = SelfFence(self.settings, time.monotonic())
        self.leader = HALeader(policy, store, ops, host, clock=clock)
        self.restorer = restorer  # carries out restore orders for this host (noshared)
        self.watchdog = (Watchdog(watchdog, self.settings.self_fence_after)
                         if watchdog and Watchdog.available(watchdog) else None)
        self.is_leader: Callable[[], bool] = lambda: False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._published: dict[str, str] = {}  # vm -> hash of the XML published
        self._last_publish = 0.0
        self._last_trim = 0.0
        self._reported_episode = 0
        self._fenced_vms: list[str] = []
        self._fenced_wall: float | None = None
        self._libvirt_down: float | None = None  # wall time local libvirt stopped answering
        self.libvirt_error = ""  # why (published in members/<host>: no failover target)

    # -- threads --------------------------------------------------------------------------
    def start(self) -> None:
        for name, fn in (("ha-guard", self._guard_loop), ("ha-engine", self._engine_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("HA on %s: %d HA VMs, lease %gs, self-fence after %gs without renewal, "
                 "fence delay %gs, watchdog %s", self.host, len(self.policy.vms),
                 self.settings.lease_ttl, self.settings.self_fence_after,
                 self.settings.fence_delay, self.watchdog.path if self.watchdog else "none")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        if self.watchdog is not None:
            self.watchdog.disarm()

    def _guard_loop(self) -> None:
        while not self._stop.wait(GUARD_PERIOD):
            try:
                self.guard(time.monotonic())
            except Exception:
                log.exception("HA guard failed; retrying")

    def _engine_loop(self) -> None:
        while not self._stop.wait(ENGINE_PERIOD):
            try:
                self.engine(self.clock())
            except Exception as exc:
                log.warning("HA engine: %s", exc)

    # -- guard: self-fencing --------------------------------------------------------------
    def guard(self, now: float) -> list[str]:
        sent = self.coord.last_renew_sent
        if sent is not None and sent > self.fence.last_sent:
            self.fence.renewed(sent)
            if self.watchdog is not None:
                self._watchdog()
        if not self.fence.due(now):
            return []
        try:
            victims = self.ops.local_ha_running(self.host, set(self.policy.vms))
        except Exception as exc:
            self.ops._drop(self.host)
            log.error("self-fencing: cannot list the local VMs: %s", exc)
            if self.watchdog is not None:
                self.watchdog.abandon()  # the board resets the host at its timeout
            # libvirt is gone but the QEMUs may run on: kill them by libvirt's pid files
            # (only for a local qemu:///system, whose files this agent can read)
            killed = (kill_by_pidfile(self.policy.vms, self.qemu_run_dir)
                      if self.qemu_run_dir else [])
            for vm in killed:
                log.warning("self-fenced: killed the QEMU of %s by its pid file, libvirt "
                            "not answering (no lease renewal for %.1fs)", vm,
                            now - self.fence.last_sent)
                self._fenced_vms.append(vm)
                self._fenced_wall = self.clock()
            return killed
        for vm in victims:
            try:
                self.ops._conn(self.host).lookup(vm).destroy()
                log.warning("self-fenced: destroyed %s (no lease renewal for %.1fs)", vm,
                            now - self.fence.last_sent)
                self._fenced_vms.append(vm)
                self._fenced_wall = self.clock()
            except Exception as exc:
                log.error("self-fencing: destroying %s failed: %s", vm, exc)
        return victims

    def _watchdog(self) -> None:
        """Armed (and petted) only while HA VMs run here, as Proxmox's watchdog-mux: a
        host without HA VMs is never reset by it."""
        assert self.watchdog is not None
        try:
            ha_here = bool(self.ops.local_ha_running(self.host, set(self.policy.vms)))
        except Exception as exc:
            log.warning("watchdog: cannot list the local VMs (%s); keeping it as it is", exc)
            self.watchdog.pet()
            return
        if ha_here and self.watchdog.fd is None:
            self.watchdog.arm()
        elif ha_here:
            self.watchdog.pet()
        elif self.watchdog.fd is not None:
            self.watchdog.disarm()

    # -- engine: publish, report, lead ------------------------------------------------------
    def engine(self, now: float) -> None:
        if self.fence.fenced or not self.coord.holds_lease(self.settings.self_fence_after):
            return
        if self.fence.episode > self._reported_episode:
            self._report_fencing(now)
        if now - self._last_publish >= PUBLISH_EVERY:
            self._last_publish = now
            self.publish(now)
        if self.restorer is not None:
            try:
                self.restorer.poll(now)
            except Exception as exc:  # never holds up the leader's step below
                log.warning("HA restore orders: %s", exc)
        if self.is_leader():
            members = self.reader.read_members()
            live = {m.host: LiveHost(m.host, m.cpus, m.memory_mib, tuple(m.running_vms),
                                     libvirt_ok=m.libvirt_ok)
                    for m in members}
            if not self.coord.holds_lease(self.settings.self_fence_after):
                return
            self.leader.step(now, live, set(self.coord.ever_seen) | self.reader.ever_seen)
            if now - self._last_trim > 60:
                self._last_trim = now
                self.store.trim_events()

    def _local_xmls(self) -> dict[str, str]:
        hv = self.ops._conn(self.host)
        out: dict[str, str] = {}
        for vm in self.ops.local_ha_running(self.host, set(self.policy.vms)):
            try:
                out[vm] = hv.lookup(vm).xml(inactive=True)
            except DomainNotFound:
                continue  # undefined since the listing
        return out

    def publish(self, now: float) -> None:
        """Publish the local HA VMs' XML. Local libvirt unreachable (libvirtd died or
        hangs; its QEMUs run on): reported once, retried every ``PUBLISH_EVERY`` —
        and nothing else is held up (the lease, the leader's step, restore orders)."""
        done, r = _in_thread(self._local_xmls, LOCAL_TIMEOUT)
        if not done or isinstance(r, Exception):
            self.ops._drop(self.host)  # a new connection once libvirtd is back
            self._libvirt_failed(now, f"no answer within {LOCAL_TIMEOUT:g}s" if not done
                                 else str(getattr(r, "message", r)))
            return
        if self._libvirt_down is not None:
            self._libvirt_back(now)
        for vm, xml in r.items():
            h = hashlib.sha256(xml.encode()).hexdigest()
            if self._published.get(vm) != h or self.store.where(vm) != self.host:
                self.store.put_domain(vm, xml, self.host, now)
                self._published[vm] = h

    def _libvirt_failed(self, now: float, why: str) -> None:
        """Not a host failure: the guests run on and the lease is renewed, so nobody
        restarts them elsewhere and this host fences nothing (see docs/operations.md,
        "When libvirtd dies")."""
        if self._libvirt_down is not None:
            log.debug("libvirt on %s still unreachable: %s", self.host, why)
            return
        log.error("libvirt on %s unreachable (%s): its VMs run on; no failover while this"
                  " host renews its lease; retrying every %gs", self.host, why,
                  PUBLISH_EVERY)
        self.store.add_event("detected", f"libvirt on {self.host} unreachable ({why}); "
                             "its VMs run on, no failover while its lease is renewed",
                             host=self.host, now=now,
                             detail={"libvirt": "unreachable", "error": why[:200]})
        self._libvirt_down = now  # after the event: an etcd error retries it
        self.libvirt_error = why[:200]

    def _libvirt_back(self, now: float) -> None:
        assert self._libvirt_down is not None
        took = now - self._libvirt_down
        log.warning("libvirt on %s answers again after %.0fs", self.host, took)
        self.store.add_event("detected", f"libvirt on {self.host} answers again after "
                             f"{took:.0f}s", host=self.host, now=now,
                             detail={"libvirt": "reachable", "down_s": round(took, 1)})
        self._libvirt_down = None
        self.libvirt_error = ""

    @property
    def libvirt_down(self) -> float | None:
        """Wall time since when this host's libvirt does not answer (None: it answers).
        The agent publishes it in ``members/<host>``: the leader never places a VM here
        meanwhile (the host is alive: not fenced, its VMs not failed over)."""
        return self._libvirt_down

    def _report_fencing(self, now: float) -> None:
        vms, self._fenced_vms = self._fenced_vms, []
        self.store.add_event("self-fenced", f"{self.host} could not renew its lease for "
                             f"{self.settings.self_fence_after:g}s and destroyed its HA VMs"
                             f" ({', '.join(vms) or 'none ran'})", host=self.host,
                             now=self._fenced_wall or now, detail={"vms": vms})
        self._reported_episode = self.fence.episode
        mine = [vm for vm in vms if self.store.where(vm) == self.host]
        if mine:  # the lease may not have expired: ask the leader to restart them
            rec = {"host": self.host, "detected": now, "fence_until": now, "plan": None,
                   "started": {}, "ready": {}, "failed": {}, "done": False,
                   "by": self.host, "self_reported": True}
            if self.store.create_failover(self.host, rec):
                self.store.add_event("detected", f"{self.host} fenced itself; its HA VMs "
                                     f"({', '.join(mine)}) restart elsewhere",
                                     host=self.host, now=now, detail={"vms": mine})


def admit(policy: HAPolicy, inv: inventory.Inventory) -> HAPolicy:
    """Admission control at config load (docs/operations.md): with ``admission =
    "refuse"`` the VMs that would break the cluster's N+k tolerance are left out of HA
    (one error line each; the agent runs HA for the rest); with ``"warn"`` they stay in,
    one warning each."""
    admitted, refused = admission.enforce(policy, state_from_inventory(inv))
    refuse = policy.settings.admission == "refuse"
    for vm, why in sorted(refused.items()):
        if refuse:
            log.error("HA admission refused %s: no HA for it on this agent (%s)", vm, why)
        else:
            log.warning("HA admission (warn): %s would not be restarted: %s", vm, why)
    return admitted


def make_ha_runtime(cfg: Config, host: str, coord: EtcdCoordinator,
                    connect: Callable[[str], Hypervisor] | None = None) -> HARuntime | None:
    """The HA runtime, or None when HA is off (no ``[ha]`` table or no VM under HA).
    ConfigError (exit 2) on a bad inventory or ``[ha]`` table."""
    if "ha" not in cfg.raw:
        return None
    inv = inventory.from_config(cfg)
    policy = admit(load_policy(inv), inv)
    if not policy.vms:
        return None
    uris = {h.name: h.uri for h in inv.hosts.values() if h.uri}
    uris[host] = cfg.connect
    if connect is None:
        from vmdr.hypervisor import connect as lv_connect

        connect = lv_connect
    store_coord = EtcdCoordinator(coord.endpoints, coord.ttl, coord.prefix)
    store = HAStore.for_coordinator(store_coord, me=host)
    coord.ttl = max(2, int(policy.settings.lease_ttl))  # the [ha] lease governs
    ops = LibvirtOps(uris, connect)
    return HARuntime(host, policy, coord, store, ops, reader=store_coord,
                     restorer=make_restorer(cfg, inv, policy, host, store, ops))


def check_repositories(cfg: Config, policy: HAPolicy,
                       inv: inventory.Inventory | None = None) -> None:
    """ConfigError (exit 2) for an ``ha_repository`` that names no ``[repositories.NAME]``
    (also ``vmdr ha validate``); a tier's ``ha_repository`` is named as the tier's key."""
    known = ", ".join(sorted(cfg.repositories)) or "none declared"
    if inv is not None:
        for t in sorted(inv.tiers.values(), key=lambda t: t.name):
            if t.ha_repository is not None and t.ha_repository not in cfg.repositories:
                raise ConfigError(f"{cfg.path}: plan.tiers.{t.name}.ha_repository: unknown "
                                  f"repository {t.ha_repository!r} (known: {known})")
    for r in sorted(policy.vms.values(), key=lambda r: r.name):
        if r.repository is not None and r.repository not in cfg.repositories:
            raise ConfigError(f"{cfg.path}: vm.{r.name}.ha_repository: unknown repository "
                              f"{r.repository!r} (known: {known})")


def make_restorer(cfg: Config, inv: inventory.Inventory, policy: HAPolicy, host: str,
                  store: HAStore, ops: LibvirtOps) -> RestoreExecutor | None:
    """The executor of restore orders (HA VMs with ``ha_storage = "local"``), or None
    when no HA VM is local. ConfigError for an ``ha_repository`` that names no
    ``[repositories.NAME]``."""
    local = [r for r in policy.vms.values() if r.local]
    check_repositories(cfg, policy, inv)
    if not local:
        return None
    h = inv.hosts.get(host)
    state = cfg.agent.state if cfg.agent.state else "/var/lib/vmdr/agent.db"
    return RestoreExecutor(
        host, store, cfg, h.target_dir if h else "/var/lib/libvirt/images",
        lambda vm: bool(ops.local_ha_running(host, {vm})),
        os.path.dirname(os.path.abspath(state)), inv=inv)
