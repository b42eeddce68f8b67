"""Recovery plans: ``[recovery_plans.NAME]`` of the inventory, parsed and validated.

A recovery plan names the VMs that fail over together (each must have a replica,
``[replicas]`` / ``replica_to``), in the order of the inventory's ``boot_group`` and
``depends_on``, with per group a readiness condition, a delay and pre/post scripts, the
network mapping source → DR and source → test bubble, and re-IP rules applied in the
guest through its agent. ``vmdr recovery check`` validates it against both sites;
``vmdr failover`` / ``vmdr failback`` run it (docs/operations.md, "Hot site: recovery
plans and failover").

Everything here is pure: the inventory's own checks (unknown VMs in ``depends_on``,
cycles, groups that contradict dependencies) run first; every error names the file and
the key, e.g. ``vmdr.toml: recovery_plans.shop.vms: unknown VM 'db9'`` (exit 2).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from vmdr.config import Config
from vmdr.errors import ConfigError
from vmdr.plan import inventory as invmod
from vmdr.plan._toml import T
from vmdr.plan._toml import tables as _tables

SECTION = "recovery_plans"
DEFAULT_REPORTS = "/var/lib/vmdr/recovery"
DEFAULT_REPLICA_ROOT = "/var/lib/libvirt/images/vmdr-replicas"
READY_RE = re.compile(r"^(agent|none|tcp:\d{1,5}|exec:.+|guest:.+)$")
SCRIPT_RE = re.compile(r"^(host|guest):.+$")
REIP_HELPERS = ("auto", "debian", "busybox")
PLAN_KEYS = {"vms", "dr_host", "dr_dir", "network_map", "test_network_map", "rpo", "ready",
             "ready_delay", "ready_timeout", "shutdown_timeout", "reip", "reip_rules",
             "groups", "description"}
GROUP_KEYS = {"ready", "delay", "timeout", "pre", "post"}
RULE_KEYS = {"from", "to", "test_to", "gateway", "dns"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


@dataclass(frozen=True)
class ReIPRule:
    """Addresses in ``source`` become the same host part in ``dr`` (or ``test`` in a test
    failover), with an optional gateway and DNS servers of the new subnet."""

    source: ipaddress.IPv4Network
    dr: ipaddress.IPv4Network
    test: ipaddress.IPv4Network | None = None
    gateway: str | None = None
    dns: tuple[str, ...] = ()

    def map(self, addr: str, test: bool = False) -> str | None:
        """``addr`` (``a.b.c.d`` or ``a.b.c.d/nn``) moved into the new subnet, with the new
        prefix length; None if the rule does not match it."""
        ip = ipaddress.IPv4Address(addr.split("/", 1)[0])
        if ip not in self.source:
            return None
        dst = self.test if test and self.test is not None else self.dr
        host = int(ip) - int(self.source.network_address)
        new = ipaddress.IPv4Address(int(dst.network_address) + (host % dst.num_addresses))
        return f"{new}/{dst.prefixlen}"


@dataclass(frozen=True)
class GroupSpec:
    """One priority group (an inventory ``boot_group``) of a recovery plan."""

    number: int
    vms: tuple[str, ...]  # in boot order (dependencies first)
    ready: str = "agent"  # agent | none | tcp:PORT | exec:HOST-COMMAND | guest:COMMAND
    delay_s: float = 0.0  # after every VM of the group is ready
    timeout_s: float = 300.0
    pre: tuple[str, ...] = ()  # host:CMD | guest:CMD, before the group starts
    post: tuple[str, ...] = ()  # after it is ready


@dataclass(frozen=True)
class PlanVM:
    """A VM of a plan and where its replica lives."""

    name: str
    to: str  # the DR host's libvirt URI
    host: str | None  # the DR host's inventory name, if it has one
    directory: str  # the replica's directory at the DR host
    standby: str
    source_uri: str | None  # the source host's URI (None: vmdr's --connect)
    rpo_s: float | None
    network_map: tuple[tuple[str, str], ...]
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecoveryPlan:
    name: str
    vms: dict[str, PlanVM]
    groups: tuple[GroupSpec, ...]
    network_map: dict[str, str] = field(default_factory=dict)  # source -> DR
    test_network_map: dict[str, str] = field(default_factory=dict)  # source -> test
    rpo_s: float | None = None
    shutdown_timeout_s: float = 180.0
    reip_helper: str = "auto"  # auto | debian | busybox | script:PATH
    reip_rules: tuple[ReIPRule, ...] = ()
    description: str = ""

    def order(self) -> list[str]:
        return [vm for g in self.groups for vm in g.vms]

    def group_of(self, vm: str) -> GroupSpec:
        return next(g for g in self.groups if vm in g.vms)

    def dr_networks(self, vm: str) -> dict[str, str]:
        return {**dict(self.vms[vm].network_map), **self.network_map}

    def rpo_target(self, vm: str) -> float | None:
        return self.rpo_s if self.rpo_s is not None else self.vms[vm].rpo_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "vms": {n: {"dr_host": v.host or v.to, "directory": v.directory,
                        "standby": v.standby, "rpo_target_s": self.rpo_target(n)}
                    for n, v in self.vms.items()},
            "groups": [{"group": g.number, "vms": list(g.vms), "ready": g.ready,
                        "delay_s": g.delay_s, "timeout_s": g.timeout_s,
                        "pre": list(g.pre), "post": list(g.post)} for g in self.groups],
            "network_map": self.network_map, "test_network_map": self.test_network_map,
            "reip_helper": self.reip_helper,
            "reip_rules": [{"from": str(r.source), "to": str(r.dr),
                            "test_to": str(r.test) if r.test else None,
                            "gateway": r.gateway, "dns": list(r.dns)}
                           for r in self.reip_rules],
        }


def reports_dir(cfg: Config) -> str:
    """Where run reports go: ``[recovery] reports`` (default /var/lib/vmdr/recovery)."""
    t = T(cfg.path or "<config>", "recovery.", cfg.raw.get("recovery", {}))
    t.finish({"reports"})
    return t.str_("reports", DEFAULT_REPORTS) or DEFAULT_REPORTS


def _map(t: T, key: str) -> dict[str, str]:
    raw = t.t.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise t.err(key, "expected a table of source network = \"network\"")
    return {str(k): str(v) for k, v in raw.items()}


def _net(t: T, key: str, value: object) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(str(value), strict=False)
    except ValueError:
        raise t.err(key, f"expected an IPv4 subnet such as 10.0.1.0/24, got {value!r}") \
            from None


def _rules(t: T) -> tuple[ReIPRule, ...]:
    raw = t.t.get("reip_rules", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise t.err("reip_rules", "expected a list of tables {from = ..., to = ...}")
    out = []
    for i, r in enumerate(raw):
        rt = T(t.path, f"{t.prefix}reip_rules[{i}].", r)
        rt.finish(RULE_KEYS)
        if "from" not in r or "to" not in r:
            raise rt.err("from" if "from" not in r else "to", "missing (required)")
        src, dst = _net(rt, "from", r["from"]), _net(rt, "to", r["to"])
        test = _net(rt, "test_to", r["test_to"]) if "test_to" in r else None
        gw = rt.str_("gateway")
        if gw is not None:
            try:
                if ipaddress.IPv4Address(gw) not in dst:
                    raise rt.err("gateway", f"{gw} is not in {dst}")
            except ValueError:
                raise rt.err("gateway", f"expected an IPv4 address, got {gw!r}") from None
        out.append(ReIPRule(src, dst, test, gw, rt.strs("dns")))
    return tuple(out)


def _ready(t: T, key: str, default: str) -> str:
    v = t.str_(key, default) or default
    if not READY_RE.match(v):
        raise t.err(key, f"expected agent, none, tcp:PORT, exec:COMMAND or guest:COMMAND, "
                         f"got {v!r}")
    return v


def _scripts(t: T, key: str) -> tuple[str, ...]:
    v = t.strs(key)
    for s in v:
        if not SCRIPT_RE.match(s):
            raise t.err(key, f"expected host:COMMAND or guest:COMMAND, got {s!r}")
    return v


def _where(inv: invmod.Inventory, vm: str, t: T, dr_host: str | None,
           dr_dir: str | None) -> PlanVM:
    decl = inv.replicas.get(vm)
    if decl is None:
        raise t.err("vms", f"{vm} has no replica: set [vm.{vm}] replica_to (or list it in "
                           "[replicas] vms) and run `vmdr replicate`")
    to = dr_host or decl.to
    host = inv.hosts.get(to) if "://" not in to else None
    if "://" in to:
        uri, root = to, DEFAULT_REPLICA_ROOT
    elif host is None:
        raise t.err("dr_host" if dr_host else "vms",
                    f"unknown DR host {to!r} (known: {', '.join(sorted(inv.hosts)) or 'none'})")
    elif not host.uri:
        raise t.err("dr_host" if dr_host else "vms", f"inventory host {to!r} has no uri")
    else:
        uri, root = host.uri, f"{host.target_dir.rstrip('/')}/vmdr-replicas"
    directory = f"{(dr_dir or decl.directory or root).rstrip('/')}/{vm}"
    if not directory.startswith("/"):
        raise t.err("dr_dir", f"must be an absolute path, got {directory!r}")
    plan_vm = inv.vms.get(vm)
    src_host = inv.hosts.get(plan_vm.host) if plan_vm and plan_vm.host else None
    rpo = decl.rpo_s if decl.rpo_s is not None else (inv.rpo_target(plan_vm) if plan_vm
                                                     else None)
    return PlanVM(vm, uri, host.name if host else None, directory,
                  decl.standby or f"{vm}-replica", src_host.uri if src_host else None,
                  rpo, decl.network_map, plan_vm.depends_on if plan_vm else ())


def load_plans(cfg: Config, inv: invmod.Inventory | None = None) -> dict[str, RecoveryPlan]:
    """Every recovery plan of the config (ConfigError, exit 2, on the first problem)."""
    path = cfg.path or "<config>"
    raw = cfg.raw.get(SECTION, {})
    if not raw:
        return {}
    inv = inv or invmod.from_config(cfg)
    return {name: _plan(inv, name, t) for name, t in _tables(path, cfg.raw, SECTION).items()}


def _plan(inv: invmod.Inventory, name: str, t: T) -> RecoveryPlan:
    if not NAME_RE.match(name) or name == "report":
        raise ConfigError(f"{t.path}: {SECTION}.{name}: a plan name is letters, digits, "
                          "'.', '_' and '-' (at most 48), not 'report'")
    t.finish(PLAN_KEYS)
    names = t.strs("vms")
    if not names:
        raise t.err("vms", "missing: list the VMs of the plan")
    for vm in names:
        if names.count(vm) > 1:
            raise t.err("vms", f"{vm} is listed twice")
        if vm not in inv.vms and vm not in inv.replicas:
            known = ", ".join(sorted(inv.vms)) or "no [vm.NAME] declared"
            raise t.err("vms", f"unknown VM {vm!r} (known: {known})")
    dr_host, dr_dir = t.str_("dr_host"), t.str_("dr_dir")
    vms = {vm: _where(inv, vm, t, dr_host, dr_dir) for vm in names}
    for vm in names:
        for dep in vms[vm].depends_on:
            if dep not in vms:
                raise t.err("vms", f"{vm} depends on {dep}, which is not in the plan: add it "
                                   "(a plan brings up whole applications)")
    ready = _ready(t, "ready", "agent")
    delay = t.duration("ready_delay", 0.0) or 0.0
    timeout = t.duration("ready_timeout", 300.0) or 300.0
    groups_t = {}
    if "groups" in t.t:
        gt = T(t.path, f"{t.prefix}groups.", t.t["groups"])
        for key in gt.t:
            if not str(key).isdigit():
                raise gt.err(str(key), "expected a boot group number, e.g. [recovery_plans."
                                       f"{name}.groups.1]")
            groups_t[int(key)] = T(t.path, f"{gt.prefix}{key}.", gt.t[key])
    order = invmod.boot_order(inv, [v for v in names if v in inv.vms])
    order += [v for v in names if v not in inv.vms]
    numbers = sorted({inv.vms[v].boot_group if v in inv.vms else 1 for v in names})
    groups = []
    for n in numbers:
        members = tuple(v for v in order if (inv.vms[v].boot_group if v in inv.vms else 1) == n)
        g = groups_t.pop(n, None) or T(t.path, f"{t.prefix}groups.{n}.", {})
        g.finish(GROUP_KEYS)
        groups.append(GroupSpec(n, members, _ready(g, "ready", ready),
                                g.duration("delay", delay) or 0.0,
                                g.duration("timeout", timeout) or timeout,
                                _scripts(g, "pre"), _scripts(g, "post")))
    if groups_t:
        n = sorted(groups_t)[0]
        raise groups_t[n].err("ready", f"boot group {n} has no VM of this plan (groups: "
                                       f"{', '.join(map(str, numbers))})")
    helper = t.str_("reip", "auto") or "auto"
    if helper not in REIP_HELPERS and not (helper.startswith("script:") and len(helper) > 8):
        raise t.err("reip", f"expected auto, debian, busybox or script:PATH, got {helper!r}")
    return RecoveryPlan(
        name, vms, tuple(groups), _map(t, "network_map"), _map(t, "test_network_map"),
        t.duration("rpo"), t.duration("shutdown_timeout", 180.0) or 180.0, helper,
        _rules(t), t.str_("description", "") or "")


def plan_named(cfg: Config, name: str) -> RecoveryPlan:
    plans = load_plans(cfg)
    if name not in plans:
        known = ", ".join(sorted(plans)) or f"none: add [{SECTION}.NAME] to the config"
        raise ConfigError(f"unknown recovery plan {name!r} (known: {known})")
    return plans[name]
