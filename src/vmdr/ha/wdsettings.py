"""Watchdog settings of each VM, from the one inventory: defaults, tier, VM.

Where they come from, last one wins::

    built-in defaults (below, the same as vmdr.ha.settings')
    [ha]                          vm_monitor_interval, vm_hang_timeout, app_monitor_interval,
                                  restart_budget, restart_window, on_budget_exhausted
                                  (parsed and checked by vmdr.ha.settings)
    [plan.tiers.NAME.watchdog]    every key of the table below
    [vm.NAME.watchdog]            every key of the table below

    [vm.web.watchdog]
    enabled = true            # default: true when the VM or its tier has a watchdog table
                              # or is under HA (ha = true)
    heartbeat = true          # guest-agent ping (false: lifecycle events and checks only)
    interval = "10s"          # agent ping interval
    hang_timeout = "30s"      # no answer for this long = hung guest (≥ 2 intervals)
    min_uptime = "2m"         # after a (re)start: time the guest gets to answer again
    action = "reset"          # reset (the reset button) | restart (power off, start)
    restart_budget = 3        # VM-level actions per restart_window, then...
    restart_window = "1h"
    on_budget_exhausted = "failover"   # ...hand over to HA (another host) | "alert"
    evidence_dir = "/var/lib/vmdr/watchdog"   # console screenshots and logs
    app_interval = "30s"      # application checks

    [[vm.web.watchdog.checks]]
    name = "http"             # default: the kind and target
    tcp = 80                  # exactly one of: tcp = PORT | process = "NAME" | command = "..."
    restart = "httpd -p 80 -h /www"   # run in the guest by /bin/sh -c; none: escalate
    failures = 2              # consecutive failed checks before acting
    restarts = 3              # application restarts per restart_window before the VM level
    timeout = "10s"           # per check and per restart command

Defaults and why
================

* ``interval = 10s``: Masakari's instance monitor pings the guest agent every 10 s, and
  Pacemaker's VirtualDomain resource is monitored every 10 s. Lifecycle events (a crash,
  a QEMU process that died, a pause on an I/O error) need no interval: they are acted
  on in the cycle after they arrive.
* ``hang_timeout = 30s``: vSphere HA VM monitoring resets a guest whose heartbeats stop
  for its *failure interval*: 30 s at high sensitivity, 60 s medium, 120 s low. 30 s is
  three missed pings, so one slow answer under load never resets a guest; raise it to
  60–120 s on hosts that are often overloaded. It must be at least two intervals.
* ``min_uptime = 2m``: vSphere's minimum uptime at high sensitivity (120 s). A guest
  that was just started or reset is not judged hung before it has answered once; if it
  has not answered within ``min_uptime``, the reset counts as failed and the next one
  follows.
* ``restart_budget = 3`` per ``restart_window = 1h``: vSphere's "maximum per-VM resets"
  (3) at high sensitivity, within its 1 h window. Once spent, the VM is handed to the HA
  layer, which restarts it on another host (``failover``), or an alert is raised.
* ``app_interval = 30s``, ``failures = 2``, ``restarts = 3``: vSphere application
  monitoring expects an application heartbeat every 30 s; two failures in a row (a
  minute) before a restart keep one lost answer from restarting a service; three
  restarts that do not hold mean the guest itself is sick, so the VM level takes over
  (Pacemaker's ``migration-threshold`` is commonly set to 3 for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from vmdr.config import Config
from vmdr.errors import ConfigError
from vmdr.plan._toml import T
from vmdr.plan.inventory import Inventory

from .settings import parse_settings

__all__ = ["AppCheck", "WatchdogSettings", "for_vm", "parse_all"]

Action = Literal["reset", "restart"]
Escalation = Literal["failover", "alert"]
CheckKind = Literal["tcp", "process", "command"]
ACTIONS: tuple[str, ...] = ("reset", "restart")
ESCALATIONS: tuple[str, ...] = ("failover", "alert")
CHECK_KINDS: tuple[str, ...] = ("tcp", "process", "command")
TABLE_KEYS = {"enabled", "heartbeat", "interval", "hang_timeout", "min_uptime", "action",
              "restart_budget", "restart_window", "on_budget_exhausted", "evidence_dir",
              "app_interval", "checks"}
CHECK_KEYS = {"name", "tcp", "process", "command", "restart", "failures", "restarts",
              "timeout"}
DEFAULT_EVIDENCE_DIR = "/var/lib/vmdr/watchdog"


@dataclass(frozen=True)
class AppCheck:
    """One application check of a VM, run through its guest agent."""

    name: str
    kind: CheckKind
    target: str  # port, process name, or shell command
    restart: str | None = None
    failures: int = 2
    restarts: int = 3
    timeout_s: float = 10.0

    def describe(self) -> str:
        return {"tcp": f"TCP port {self.target}", "process": f"process {self.target}",
                "command": f"command {self.target!r}"}[self.kind]


@dataclass(frozen=True)
class WatchdogSettings:
    """The effective watchdog settings of one VM."""

    vm: str
    enabled: bool = False
    heartbeat: bool = True
    interval_s: float = 10.0
    hang_timeout_s: float = 30.0
    min_uptime_s: float = 120.0
    action: Action = "reset"
    restart_budget: int = 3
    restart_window_s: float = 3600.0
    on_budget_exhausted: Escalation = "failover"
    evidence_dir: str = DEFAULT_EVIDENCE_DIR
    app_interval_s: float = 30.0
    checks: tuple[AppCheck, ...] = ()


def _positive(t: T, key: str, default: float) -> float:
    v = t.duration(key, default)
    if v is None or v <= 0:
        raise t.err(key, f"must be longer than 0s, got {t.t.get(key)!r}")
    return v


def _apply(t: T, s: WatchdogSettings) -> WatchdogSettings:
    """``s`` with the keys of the watchdog table ``t``."""
    upd: dict[str, Any] = {}
    if "enabled" in t.t:
        upd["enabled"] = t.bool_("enabled")
    if "heartbeat" in t.t:
        upd["heartbeat"] = t.bool_("heartbeat")
    if "action" in t.t:
        upd["action"] = t.choice("action", ACTIONS, s.action)
    if "evidence_dir" in t.t:
        upd["evidence_dir"] = t.str_("evidence_dir")
    for key, attr in (("interval", "interval_s"), ("hang_timeout", "hang_timeout_s"),
                      ("min_uptime", "min_uptime_s"), ("restart_window", "restart_window_s"),
                      ("app_interval", "app_interval_s")):
        if key in t.t:
            upd[attr] = _positive(t, key, getattr(s, attr))
    if "restart_budget" in t.t:
        upd["restart_budget"] = t.int_("restart_budget", s.restart_budget, 0)
    if "on_budget_exhausted" in t.t:
        upd["on_budget_exhausted"] = t.choice("on_budget_exhausted", ESCALATIONS,
                                              s.on_budget_exhausted)
    return replace(s, **upd)


def _checks(t: T) -> tuple[AppCheck, ...]:
    raw = t.t.get("checks", [])
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise t.err("checks", "expected a list of tables ([[...watchdog.checks]])")
    out: list[AppCheck] = []
    for i, item in enumerate(raw):
        c = T(t.path, f"{t.prefix}checks[{i}].", item)
        kinds = [k for k in CHECK_KINDS if k in c.t]
        if len(kinds) != 1:
            raise c.err("tcp", "give exactly one of tcp = PORT, process = \"NAME\" or "
                               "command = \"...\"")
        kind = kinds[0]
        if kind == "tcp":
            port = c.int_("tcp", None, 1)
            if port is None or port > 65535:
                raise c.err("tcp", f"expected a port 1-65535, got {c.t['tcp']!r}")
            target = str(port)
        else:
            target = c.str_(kind, required=True) or ""
        name = c.str_("name", f"{kind}:{target}") or f"{kind}:{target}"
        if any(x.name == name for x in out):
            raise c.err("name", f"duplicate check name {name!r}")
        out.append(AppCheck(
            name, cast(CheckKind, kind), target, c.str_("restart"),
            c.int_("failures", 2, 1) or 1, c.int_("restarts", 3, 0) or 0,
            _positive(c, "timeout", 10.0)))
        c.finish(CHECK_KEYS)
    return tuple(out)


def _table(path: str, prefix: str, raw: Any) -> T | None:
    if raw is None:
        return None
    if raw is True or raw is False:
        return T(path, prefix, {"enabled": raw})
    return T(path, prefix, raw)


def _validate(t: T | None, s: WatchdogSettings, where: str) -> None:
    if s.hang_timeout_s < 2 * s.interval_s:
        key = "hang_timeout"
        problem = (f"hang_timeout {s.hang_timeout_s:g}s is less than two intervals "
                   f"({2 * s.interval_s:g}s): one late answer would reset the guest")
        if t is not None and ("hang_timeout" in t.t or "interval" in t.t):
            raise t.err(key if "hang_timeout" in t.t else "interval", problem)
        raise ConfigError(f"{where}: {problem}")
    for c in s.checks:
        if c.timeout_s > s.app_interval_s and t is not None:
            raise t.err("checks", f"check {c.name!r}: timeout {c.timeout_s:g}s is longer "
                                  f"than app_interval {s.app_interval_s:g}s")


def for_vm(cfg: Config, inv: Inventory, vm: str) -> WatchdogSettings:
    """The effective settings of ``vm`` (ConfigError naming the key on bad input). A VM not
    in the inventory gets the defaults and ``[ha]``. A VM under HA (``ha = true`` on it or
    its tier) is watched unless its watchdog table says ``enabled = false``."""
    path, raw = inv.path, cfg.raw
    hs = parse_settings(path, inv.ha_table)  # the whole [ha] table, checked once
    s = WatchdogSettings(
        vm, interval_s=hs.vm_monitor_interval, hang_timeout_s=hs.vm_hang_timeout,
        app_interval_s=hs.app_monitor_interval, restart_budget=hs.restart_budget,
        restart_window_s=hs.restart_window,
        on_budget_exhausted=cast(Escalation, hs.on_budget_exhausted))
    plan = inv.vms.get(vm)
    if plan is not None and inv.ha_enabled(plan):
        s = replace(s, enabled=True)
    tables: list[T] = []
    if plan is not None and plan.tier:
        tier_raw = raw.get("plan", {}).get("tiers", {}).get(plan.tier, {})
        tt = _table(path, f"plan.tiers.{plan.tier}.watchdog.", tier_raw.get("watchdog"))
        if tt is not None:
            tables.append(tt)
    if vm in cfg.vms:
        extra = cfg.vms[vm].extra
        for k in sorted(extra):
            if k.startswith("watchdog") and k != "watchdog":
                raise ConfigError(f"{path}: vm.{vm}.{k}: unknown setting (watchdog settings "
                                  f"go in [vm.{vm}.watchdog])")
        vt = _table(path, f"vm.{vm}.watchdog.", extra.get("watchdog"))
        if vt is not None:
            tables.append(vt)
    checks: tuple[AppCheck, ...] = ()
    for t in tables:
        s = replace(_apply(t, s), enabled=t.bool_("enabled", True))
        new = _checks(t)
        names = {c.name for c in new}
        checks = tuple(c for c in checks if c.name not in names) + new
        t.finish(TABLE_KEYS)
        s = replace(s, checks=checks)
        _validate(t, s, f"{path}: {t.prefix.rstrip('.')}")
    return s


def parse_all(cfg: Config, inv: Inventory) -> dict[str, WatchdogSettings]:
    """Settings of every VM of the inventory (validates every watchdog table)."""
    return {name: for_vm(cfg, inv, name) for name in sorted(inv.vms)}
