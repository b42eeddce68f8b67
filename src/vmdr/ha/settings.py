"""The ``[ha]`` table: timings, restart budget, admission control, fencing — as data.

Defaults and why
================

Detection and fencing (lease in etcd, renewed by each host's agent):

* ``lease_ttl = "5s"``, ``lease_renew = "1.5s"``. A host is declared failed when its
  lease expires. Measured here: with a 5 s TTL the key of a killed holder was gone
  3.9–5.4 s after ``kill -9``. vSphere HA declares a host dead after ~12 s and restarts
  at T+15 s; Proxmox VE waits for its 120 s HA lock (≈ 2 min); Pacemaker's corosync
  token is 3 s (+ 3.6 s consensus). 5 s keeps our goal (start ≤ 10 s after a crash) with
  three renewals per TTL, so one lost or late renewal (GC pause, a busy etcd) never
  costs a failover. Under heavy load raise both (e.g. 15 s / 3 s): detection slows by
  the same amount, false failovers become rarer.
* ``self_fence_margin = "1.5s"``. An agent whose last *successful* renewal was *sent*
  at ``t`` destroys its own HA VMs at ``t + lease_ttl − self_fence_margin`` if no renewal
  succeeded since (Proxmox: the node's watchdog fires before its lock can pass; Patroni:
  demote before the leader key expires). Timing starts when the request was sent, not
  when the answer came, so the agent's deadline is never later than etcd's expiry
  (etcd only grants ``ttl`` from when it handles the request, and a leader change only
  extends leases).
* ``fence_delay = "2s"``. The leader that sees a lease expire at ``E`` starts the host's
  VMs elsewhere only at ``E + fence_delay``. Safety (no double run), with ``K`` the time
  a host needs to destroy its VMs (``FENCE_KILL_BUDGET``, 1 s: SIGKILL of QEMU and
  waiting for it):

      self-fence done  ≤ t + ttl − margin + K
      restart at       ≥ E + fence_delay ≥ t + ttl + fence_delay
      ⇒ safe iff  margin + fence_delay ≥ K            (here 1.5 + 2 = 3.5 s ≥ 1 s)

  ``vmdr ha validate`` refuses settings that break it. Where ``/dev/watchdog`` exists the
  agent arms it with ``ttl − margin`` while it holds the lease, so a hung agent resets the
  host in time too. ``fence_command`` (fence-agents syntax, e.g. ``fence_ipmilan``) runs
  as a second layer; the lease expiry alone must suffice (the BMC may die with its host).
* Worst case from crash to restart: ``ttl`` (lease) + 0.5 s (etcd's expiry granularity)
  + ``fence_delay`` + placement (≤ 1 s at 50 hosts × 40 VMs) + define/start (0.3 s
  measured) ≈ 8.8 s with the defaults.

Monitoring:

* ``vm_monitor_interval = "10s"``: guest-agent ping per HA VM; Masakari pings every
  10 s and Pacemaker's VirtualDomain monitor runs every 10 s. libvirt lifecycle events
  (crash, unexpected shut-off, I/O-error pause) are acted on at once, independent of it.
* ``vm_hang_timeout = "30s"``: no heartbeat for this long = hung guest (vSphere VM
  monitoring's "high" sensitivity: 30 s). At least two intervals, so one late answer
  never resets a guest.
* ``app_monitor_interval = "30s"``: application checks (TCP port, process, command).

Restarts:

* ``restart_budget = 3`` per ``restart_window = "1h"`` on the same host (vSphere's
  maximum per-VM resets: 3 within 1 h), then ``on_budget_exhausted`` = ``"failover"``
  (restart on another host) or ``"alert"``.
* ``ready_check = "agent"`` (guest-agent heartbeat, as vSphere 6.5+ readiness and SRM's
  VMware Tools heartbeat), ``ready_delay = "0s"`` and ``ready_timeout = "5m"`` (SRM's
  default): the next priority group starts when every VM of the previous one is ready
  plus its delay, or when the timeout passes (the event says so).

Admission control:

* ``host_failures_tolerated = 1`` (N+1, the issue's and vSphere's default) and
  ``admission = "refuse"``: a VM is not put under HA if the cluster could then no longer
  restart every HA VM after any ``host_failures_tolerated`` hosts fail (``"warn"`` only
  says so). Proxmox has no admission control at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vmdr.plan._toml import T

__all__ = ["FENCE_KILL_BUDGET", "HASettings", "parse_settings"]

FENCE_KILL_BUDGET = 1.0  # s a fencing host needs to destroy its HA VMs
ETCD_EXPIRY_GRANULARITY = 0.5  # s: etcd checks leases for expiry about twice a second
ADMISSION_MODES = ("refuse", "warn")
BUDGET_ACTIONS = ("failover", "alert")
SCOPES = ("host", "rack")
KEYS = {"lease_ttl", "lease_renew", "self_fence_margin", "fence_delay", "fence_command",
        "vm_monitor_interval", "vm_hang_timeout", "app_monitor_interval", "restart_budget",
        "restart_window", "on_budget_exhausted", "host_failures_tolerated", "admission",
        "ready_check", "ready_delay", "ready_timeout", "anti_affinity"}


@dataclass(frozen=True)
class HASettings:
    lease_ttl: float = 5.0
    lease_renew: float = 1.5
    self_fence_margin: float = 1.5
    fence_delay: float = 2.0
    fence_command: str | None = None
    vm_monitor_interval: float = 10.0
    vm_hang_timeout: float = 30.0
    app_monitor_interval: float = 30.0
    restart_budget: int = 3
    restart_window: float = 3600.0
    on_budget_exhausted: str = "failover"
    host_failures_tolerated: int = 1
    admission: str = "refuse"
    ready_check: str = "agent"
    ready_delay: float = 0.0
    ready_timeout: float = 300.0
    anti_affinity_scopes: tuple[tuple[str, str], ...] = ()  # (group, "host" | "rack")

    def scope(self, group: str) -> str:
        return dict(self.anti_affinity_scopes).get(group, "host")

    @property
    def self_fence_after(self) -> float:
        """Seconds after sending the last successful renewal at which a host fences."""
        return self.lease_ttl - self.self_fence_margin

    @property
    def worst_restart_after_crash(self) -> float:
        """Upper bound from a host crash to its VMs' restart decision (no placement)."""
        return self.lease_ttl + ETCD_EXPIRY_GRANULARITY + self.fence_delay


def parse_settings(path: str, table: dict[str, Any]) -> HASettings:
    """Parse and check ``[ha]``; ConfigError naming the key on the first problem."""
    t = T(path, "ha.", table)
    d = HASettings()

    def dur(key: str, default: float) -> float:
        v = t.duration(key, default)
        return default if v is None else v

    ttl = dur("lease_ttl", d.lease_ttl)
    renew = dur("lease_renew", min(d.lease_renew, ttl / 3))
    margin = dur("self_fence_margin", min(d.self_fence_margin, ttl / 3))
    fence_delay = dur("fence_delay", d.fence_delay)
    fence_command = t.str_("fence_command")
    vm_int = dur("vm_monitor_interval", d.vm_monitor_interval)
    hang = dur("vm_hang_timeout", max(d.vm_hang_timeout, 2 * vm_int))
    app_int = dur("app_monitor_interval", d.app_monitor_interval)
    budget = t.int_("restart_budget", d.restart_budget, 0)
    window = dur("restart_window", d.restart_window)
    tolerated = t.int_("host_failures_tolerated", d.host_failures_tolerated, 0)
    ready_check = t.str_("ready_check", d.ready_check) or d.ready_check
    s = HASettings(
        lease_ttl=ttl, lease_renew=renew, self_fence_margin=margin, fence_delay=fence_delay,
        fence_command=fence_command, vm_monitor_interval=vm_int, vm_hang_timeout=hang,
        app_monitor_interval=app_int, restart_budget=budget or 0, restart_window=window,
        on_budget_exhausted=t.choice("on_budget_exhausted", BUDGET_ACTIONS, "failover"),
        host_failures_tolerated=tolerated or 0,
        admission=t.choice("admission", ADMISSION_MODES, "refuse"),
        ready_check=ready_check, ready_delay=dur("ready_delay", d.ready_delay),
        ready_timeout=dur("ready_timeout", d.ready_timeout),
        anti_affinity_scopes=_scopes(path, t),
    )
    _check_timings(t, s)
    if not re.match(r"^(agent|none|tcp:\d{1,5}|exec:.+)$", s.ready_check):
        raise t.err("ready_check", f"expected agent, none, tcp:PORT or exec:COMMAND, got "
                                   f"{s.ready_check!r}")
    if fence_command is not None:
        bad = sorted(set(re.findall(r"\{(\w*)\}", fence_command)) - {"host"})
        if bad:
            raise t.err("fence_command", f"unknown placeholder {{{bad[0]}}} (only {{host}})")
    t.finish(KEYS)
    return s


def _scopes(path: str, t: T) -> tuple[tuple[str, str], ...]:
    if "anti_affinity" not in t.t:
        return ()
    sub = T(path, "ha.anti_affinity.", t.t["anti_affinity"])
    out = []
    for group in sorted(sub.t):
        out.append((group, sub.choice(group, SCOPES, "host")))
    return tuple(out)


def _check_timings(t: T, s: HASettings) -> None:
    """Impossible or unsafe timings, each naming the key to change."""
    if s.lease_ttl <= 0:
        raise t.err("lease_ttl", "must be positive")
    if s.lease_renew <= 0:
        raise t.err("lease_renew", "must be positive")
    if s.lease_ttl <= s.lease_renew:
        raise t.err("lease_ttl", f"{s.lease_ttl:g}s is not above lease_renew "
                                 f"({s.lease_renew:g}s): the lease would expire between "
                                 "renewals")
    if s.lease_renew * 2 > s.lease_ttl:
        raise t.err("lease_renew", f"{s.lease_renew:g}s leaves fewer than two renewals per "
                                   f"lease_ttl ({s.lease_ttl:g}s): one late renewal would "
                                   "fail the host over")
    if not 0 < s.self_fence_margin < s.lease_ttl - s.lease_renew:
        raise t.err("self_fence_margin", f"must be above 0 and below lease_ttl − "
                                         f"lease_renew ({s.lease_ttl - s.lease_renew:g}s), "
                                         "so a host gets a renewal before it fences itself")
    if s.self_fence_margin + s.fence_delay < FENCE_KILL_BUDGET:
        raise t.err("fence_delay", f"self_fence_margin + fence_delay must be at least "
                                   f"{FENCE_KILL_BUDGET:g}s (the time a fencing host needs "
                                   "to destroy its VMs); a VM could run twice")
    for key in ("vm_monitor_interval", "app_monitor_interval", "restart_window"):
        if getattr(s, key) <= 0:
            raise t.err(key, "must be positive")
    if s.vm_hang_timeout < 2 * s.vm_monitor_interval:
        raise t.err("vm_hang_timeout", f"must be at least twice vm_monitor_interval "
                                       f"({2 * s.vm_monitor_interval:g}s)")
