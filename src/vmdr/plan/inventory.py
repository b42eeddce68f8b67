"""The estate inventory: locations, hosts, repositories, vaults, roles, tiers and VMs.

Parsed from the config sections ``[plan]``, ``[locations]``, ``[hosts]``,
``[repositories]``, ``[vaults]``, ``[roles]`` and the plan keys of ``[vm.NAME]`` (kept by
:mod:`vmdr.config` in ``VMConfig.extra``). Every error names the file, the key and the
problem, e.g. ``estate.toml: hosts.hv3.location: unknown location 'rack-z9'``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from vmdr.config import Config
from vmdr.errors import ConfigError
from vmdr.plan import taxonomy
from vmdr.plan._toml import T as _T
from vmdr.plan._toml import tables as _tables

MEDIA = ("disk", "object", "tape")
DEFAULT_THROUGHPUT = {"disk": 200.0 * (1 << 20), "object": 100.0 * (1 << 20),
                      "tape": 150.0 * (1 << 20)}
# [vm.NAME] keys other parts of vmdr own (verify_*: vmdr verify; copy_*: vmdr copy;
# watchdog: vmdr.ha.wdsettings, which also checks [plan.tiers.NAME.watchdog];
# replica_*: vmdr replicate)
OTHER_VM_PREFIXES = ("verify_", "copy_", "watchdog", "replica_")
REPLICA_KEYS = {"to", "points", "dir", "feed", "rpo", "network_map", "standby", "vms", "mode"}
REPLICA_FEEDS = ("direct", "repository")
REPLICA_MODES = ("snapshot", "mirror", "sync")
VM_KEYS = {"host", "owner", "contact", "tier", "rpo", "rto", "depends_on", "boot_group",
           "must_survive", "vcpus", "memory", "target_dir", "notes"}
# [vm.NAME] keys of high availability (vmdr.ha reads them; `vmdr ha validate` checks them
# against the [ha] table). Restart priority is boot_group: one order for restores and
# failovers, already checked against depends_on.
HA_VM_KEYS = {"ha", "anti_affinity", "hosts", "hosts_rule", "ready_check", "ready_delay",
              "ha_storage", "ha_repository"}
HA_STORAGE = ("shared", "local")  # local: restarted elsewhere from a replica or backup
HOSTS_RULES = ("must", "should")
READY_CHECK_RE = re.compile(r"^(agent|none|tcp:\d{1,5}|exec:.+)$")


@dataclass(frozen=True)
class Location:
    id: str
    kind: str
    parent: str | None
    name: str


@dataclass(frozen=True)
class Host:
    name: str
    location: str
    uri: str | None = None
    vcpus: int | None = None
    memory: int | None = None  # bytes
    target_dir: str = "/var/lib/libvirt/images"
    fabrics: tuple[str, ...] = ()
    migration_uri: str | None = None  # how the other hosts' libvirtd reach it (default uri)


@dataclass(frozen=True)
class Vault:
    name: str
    location: str
    retrieval_s: float = 0.0


@dataclass(frozen=True)
class RepoDecl:
    name: str
    url: str
    location: str
    media: str = "disk"
    immutable: bool = False
    host: str | None = None  # stored on this libvirt host's own disks
    vault: str | None = None  # tapes kept in this vault
    password_file: str | None = None
    key_file: str | None = None
    throughput: float | None = None  # bytes/s, overrides measured and default
    fabrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    key: str
    title: str
    person: str = ""
    contact: str = ""
    declares: bool = False
    restores: tuple[str, ...] = ()
    duties: tuple[str, ...] = ()

    def restores_vm(self, vm: str) -> bool:
        return any(fnmatch.fnmatchcase(vm, pat) for pat in self.restores)


@dataclass(frozen=True)
class Tier:
    name: str
    rpo_s: float | None = None
    rto_s: float | None = None
    must_survive: tuple[str, ...] = ()
    ha: bool = False  # every VM of the tier is under HA unless it says ha = false
    # the default of its VMs' ha_storage / ha_repository (a VM's own key wins)
    ha_storage: str | None = None
    ha_repository: str | None = None


@dataclass
class VMPlan:
    name: str
    host: str | None = None
    owner: str = ""
    contact: str = ""
    tier: str | None = None
    rpo_s: float | None = None
    rto_s: float | None = None
    depends_on: tuple[str, ...] = ()
    boot_group: int = 1
    must_survive: tuple[str, ...] = ()
    vcpus: int | None = None
    memory: int | None = None
    target_dir: str | None = None
    notes: str = ""
    declared: bool = True  # False: found by discovery only, not in the config
    # high availability (vmdr.ha)
    ha: bool | None = None  # None: the tier's setting
    anti_affinity: str | None = None  # group: its VMs never share a host (or rack)
    affinity_hosts: tuple[str, ...] = ()  # `hosts = [...]`
    hosts_rule: str = "must"  # must: only those hosts; should: preferred
    ready_check: str | None = None  # agent | none | tcp:PORT | exec:COMMAND; None: [ha]
    ready_delay_s: float | None = None  # None: [ha] ready_delay
    ha_storage: str = "shared"  # local: disks only on its host (vmdr.ha.noshared)
    ha_repository: str | None = None  # [repositories.NAME] to restore it from


@dataclass(frozen=True)
class ReplicaDecl:
    """A VM's replica (``[replicas]`` defaults, ``[vm.NAME] replica_*`` overrides)."""

    vm: str
    to: str  # an inventory host name or a libvirt URI
    points: int = 3
    directory: str | None = None  # default: <host target_dir>/vmdr-replicas/<vm>
    feed: str = "direct"
    rpo_s: float | None = None  # default: the VM's plan RPO
    network_map: tuple[tuple[str, str], ...] = ()
    standby: str | None = None
    mode: str = "snapshot"  # snapshot (cycles) | mirror (continuous, async) | sync (RPO 0)


@dataclass
class Settings:
    title: str = "Disaster recovery and business continuity plan"
    organisation: str = ""
    scope: str = ""
    verify_max_age_s: float = 30 * 86400.0
    test_interval_s: float = 90 * 86400.0
    boot_time_s: float = 120.0
    cpu_overcommit: float = 1.0
    throughput: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_THROUGHPUT))
    cache_file: str | None = None
    # discovered domains that are not part of the estate (vmdr verify's test boots)
    ignore_vms: tuple[str, ...] = ("vmdr-verify-*",)


@dataclass
class Inventory:
    path: str
    settings: Settings
    locations: dict[str, Location]
    hosts: dict[str, Host]
    repositories: dict[str, RepoDecl]
    vaults: dict[str, Vault]
    roles: dict[str, Role]
    tiers: dict[str, Tier]
    vms: dict[str, VMPlan]
    warnings: list[str] = field(default_factory=list)
    replicas: dict[str, ReplicaDecl] = field(default_factory=dict)
    ha_table: dict[str, Any] = field(default_factory=dict)  # [ha], parsed by vmdr.ha

    def ha_enabled(self, vm: VMPlan) -> bool:
        """``ha`` of the VM, else of its tier, else off."""
        if vm.ha is not None:
            return vm.ha
        t = self.vm_tier(vm)
        return bool(t and t.ha)

    # ---------------------------------------------------------------- the hierarchy
    def chain(self, loc: str) -> list[Location]:
        """*loc* and its ancestors, smallest first."""
        out = []
        cur: str | None = loc
        while cur is not None:
            out.append(self.locations[cur])
            cur = self.locations[cur].parent
        return out

    def unit(self, loc: str, kind: str) -> str | None:
        """The blast-radius unit of *kind* around *loc*: the largest ancestor no larger than
        *kind* (a building on no declared campus is its own campus), or None."""
        rank = taxonomy.KIND_RANK[kind]
        best = None
        for anc in self.chain(loc):
            if taxonomy.KIND_RANK[anc.kind] <= rank:
                best = anc.id
        return best

    def within(self, loc: str, unit: str) -> bool:
        return any(a.id == unit for a in self.chain(loc))

    def label(self, loc: str) -> str:
        return " / ".join(a.name for a in reversed(self.chain(loc)))

    def repo_location(self, repo: RepoDecl) -> str:
        return repo.location

    def vm_tier(self, vm: VMPlan) -> Tier | None:
        return self.tiers.get(vm.tier) if vm.tier else None

    def rpo_target(self, vm: VMPlan) -> float | None:
        t = self.vm_tier(vm)
        return vm.rpo_s if vm.rpo_s is not None else (t.rpo_s if t else None)

    def rto_target(self, vm: VMPlan) -> float | None:
        t = self.vm_tier(vm)
        return vm.rto_s if vm.rto_s is not None else (t.rto_s if t else None)

    def required_levels(self, vm: VMPlan) -> tuple[str, ...]:
        t = self.vm_tier(vm)
        req = vm.must_survive or (t.must_survive if t else ())
        return tuple(k for k in taxonomy.LEVEL_KEYS if k in req)

    def restorer(self, vm: str) -> Role | None:
        """The role that restores *vm*: the one with the most specific matching pattern."""
        best: tuple[int, Role] | None = None
        for r in self.roles.values():
            for pat in r.restores:
                if fnmatch.fnmatchcase(vm, pat):
                    score = len(pat.replace("*", "").replace("?", ""))
                    if best is None or score > best[0]:
                        best = (score, r)
        return best[1] if best else None

    def declarers(self) -> list[Role]:
        return [r for r in self.roles.values() if r.declares]


def _locations(path: str, raw: dict[str, Any]) -> dict[str, Location]:
    out: dict[str, Location] = {}
    tabs = _tables(path, raw, "locations")
    for lid, t in tabs.items():
        kind = t.choice("kind", taxonomy.KINDS, "") if "kind" in t.t else None
        if kind is None:
            raise t.err("kind", f"missing (one of {', '.join(taxonomy.KINDS)})")
        out[lid] = Location(lid, kind, t.str_("parent"), t.str_("name", lid) or lid)
        t.finish({"kind", "parent", "name"})
    for lid, loc in out.items():
        t = tabs[lid]
        if loc.parent is None:
            continue
        parent = out.get(loc.parent)
        if parent is None:
            raise t.err("parent", f"unknown location {loc.parent!r}")
        if taxonomy.KIND_RANK[parent.kind] <= taxonomy.KIND_RANK[loc.kind]:
            raise t.err("parent", f"a {loc.kind} cannot be inside a {parent.kind} "
                                  f"({loc.parent!r}); order: {' < '.join(taxonomy.KINDS)}")
    return out


def _need_location(t: _T, key: str, locations: dict[str, Location],
                   required: bool = True) -> str | None:
    loc = t.str_(key, required=required)
    if loc is not None and loc not in locations:
        raise t.err(key, f"unknown location {loc!r}")
    return loc


def _settings(path: str, raw: dict[str, Any]) -> tuple[Settings, dict[str, Tier]]:
    t = _T(path, "plan.", raw.get("plan", {}))
    s = Settings()
    s.title = t.str_("title", s.title) or s.title
    s.organisation = t.str_("organisation", "") or ""
    s.scope = t.str_("scope", "") or ""
    s.verify_max_age_s = t.duration("verify_max_age", s.verify_max_age_s) or s.verify_max_age_s
    s.test_interval_s = t.duration("test_interval", s.test_interval_s) or s.test_interval_s
    s.boot_time_s = t.duration("boot_time", s.boot_time_s) or s.boot_time_s
    s.cpu_overcommit = t.num("cpu_overcommit", 1.0)
    s.cache_file = t.str_("cache_file")
    if "ignore_vms" in t.t:
        s.ignore_vms = t.strs("ignore_vms")
    tp = _T(path, "plan.throughput.", t.t.get("throughput", {}))
    for media in MEDIA:
        rate = tp.rate(media)
        if rate:
            s.throughput[media] = rate
    tp.finish(set(MEDIA))
    tiers: dict[str, Tier] = {}
    for name, tt in _tables(path, t.t, "tiers").items():
        tt.prefix = f"plan.tiers.{name}."
        tiers[name] = Tier(name, tt.duration("rpo"), tt.duration("rto"),
                           _levels(tt, "must_survive"), tt.bool_("ha"),
                           tt.choice("ha_storage", HA_STORAGE, "shared")
                           if "ha_storage" in tt.t else None,
                           tt.str_("ha_repository"))
        tt.finish({"rpo", "rto", "must_survive", "ha", "watchdog", "ha_storage",
                   "ha_repository"})
    t.finish({"title", "organisation", "scope", "verify_max_age", "test_interval",
              "boot_time", "cpu_overcommit", "cache_file", "throughput", "tiers", "ignore_vms"})
    return s, tiers


def _levels(t: _T, key: str) -> tuple[str, ...]:
    levels = t.strs(key)
    for lv in levels:
        if lv not in taxonomy.BY_KEY:
            raise t.err(key, f"unknown disaster level {lv!r} (one of "
                             f"{', '.join(taxonomy.LEVEL_KEYS)})")
    return levels


def from_config(cfg: Config) -> Inventory:
    """Build and validate the inventory of *cfg* (ConfigError on the first problem)."""
    path, raw = cfg.path or "<config>", cfg.raw
    settings, tiers = _settings(path, raw)
    locations = _locations(path, raw)
    hosts: dict[str, Host] = {}
    for name, t in _tables(path, raw, "hosts").items():
        hosts[name] = Host(
            name, _need_location(t, "location", locations) or "", t.str_("uri"),
            t.int_("vcpus", None, 1), t.size("memory"),
            t.str_("target_dir", Host.target_dir) or Host.target_dir, t.strs("fabrics"),
            t.str_("migration_uri"))
        t.finish({"location", "uri", "vcpus", "memory", "target_dir", "fabrics",
                  "migration_uri"})
    vaults: dict[str, Vault] = {}
    for name, t in _tables(path, raw, "vaults").items():
        vaults[name] = Vault(name, _need_location(t, "location", locations) or "",
                             t.duration("retrieval_time", 0.0) or 0.0)
        t.finish({"location", "retrieval_time"})
    repos = {name: _repo(name, t, locations, hosts, vaults)
             for name, t in _tables(path, raw, "repositories").items()}
    roles: dict[str, Role] = {}
    for key, t in _tables(path, raw, "roles").items():
        roles[key] = Role(key, t.str_("title", key) or key, t.str_("person", "") or "",
                          t.str_("contact", "") or "", t.bool_("declares"),
                          t.strs("restores"), t.strs("duties"))
        t.finish({"title", "person", "contact", "declares", "restores", "duties"})
    inv = Inventory(path, settings, locations, hosts, repos, vaults, roles, tiers, {})
    ha = raw.get("ha", {})
    if not isinstance(ha, dict):
        raise ConfigError(f"{path}: ha: expected a table")
    inv.ha_table = ha
    for name, vc in cfg.vms.items():
        inv.vms[name] = _vm(inv, name, _T(path, f"vm.{name}.", vc.extra))
    check_dependencies(inv)
    inv.replicas = replica_decls(cfg)
    return inv


def _network_map(t: _T, key: str) -> tuple[tuple[str, str], ...]:
    raw = t.t.get(key)
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise t.err(key, "expected a table of source network = \"DR network\"")
    return tuple(sorted((str(k), str(v)) for k, v in raw.items()))


def replica_decls(cfg: Config) -> dict[str, ReplicaDecl]:
    """The replicas the config declares: every VM named in ``[replicas] vms`` or with a
    ``replica_to``; per-VM ``replica_<key>`` overrides the ``[replicas]`` default."""
    path, raw = cfg.path or "<config>", cfg.raw
    base = _T(path, "replicas.", raw.get("replicas", {}))
    base.finish(REPLICA_KEYS)
    listed = base.strs("vms")
    out: dict[str, ReplicaDecl] = {}
    for name in sorted(set(listed) | {n for n, vc in cfg.vms.items()
                                      if "replica_to" in vc.extra}):
        vc = cfg.vms.get(name)
        own = {k[len("replica_"):]: v for k, v in (vc.extra if vc else {}).items()
               if k.startswith("replica_")}
        t = _T(path, f"vm.{name}.replica_", own)
        unknown = sorted(set(own) - (REPLICA_KEYS - {"vms"}))
        if unknown:
            raise t.err(unknown[0], f"unknown replica setting (known: replica_"
                                    f"{', replica_'.join(sorted(REPLICA_KEYS - {'vms'}))})")

        def pick(key: str, t: _T = t) -> _T:
            return t if key in t.t else base

        to = pick("to").str_("to")
        if not to:
            raise t.err("to", "missing: set [replicas] to or [vm.NAME] replica_to (a host "
                              "name or a libvirt URI)")
        out[name] = ReplicaDecl(
            vm=name, to=to, points=pick("points").int_("points", 3, 1) or 3,
            directory=pick("dir").str_("dir"),
            feed=pick("feed").choice("feed", REPLICA_FEEDS, "direct"),
            rpo_s=pick("rpo").duration("rpo"),
            network_map=tuple(sorted({**dict(_network_map(base, "network_map")),
                                      **dict(_network_map(t, "network_map"))}.items())),
            standby=pick("standby").str_("standby"),
            mode=pick("mode").choice("mode", REPLICA_MODES, "snapshot"))
    return out


def _repo(name: str, t: _T, locations: dict[str, Location], hosts: dict[str, Host],
          vaults: dict[str, Vault]) -> RepoDecl:
    host = t.str_("host")
    if host is not None and host not in hosts:
        raise t.err("host", f"unknown host {host!r}")
    vault = t.str_("vault")
    if vault is not None and vault not in vaults:
        raise t.err("vault", f"unknown vault {vault!r}")
    loc = _need_location(t, "location", locations, required=False)
    if loc is None:
        if host is not None:
            loc = hosts[host].location
        elif vault is not None:
            loc = vaults[vault].location
        else:
            raise t.err("location", "missing: give location, host or vault")
    media = t.choice("media", MEDIA, "tape" if vault else "disk")
    repo = RepoDecl(name, t.str_("url", required=True) or "", loc, media,
                    t.bool_("immutable"), host, vault, t.str_("password_file"),
                    t.str_("key_file"), t.rate("restore_throughput"), t.strs("fabrics"))
    t.finish({"url", "location", "media", "immutable", "host", "vault", "password_file",
              "key_file", "restore_throughput", "fabrics"})
    return repo


def _vm(inv: Inventory, name: str, t: _T) -> VMPlan:
    host = t.str_("host")
    if host is not None and host not in inv.hosts:
        raise t.err("host", f"unknown host {host!r}")
    tier = t.str_("tier")
    if tier is not None and tier not in inv.tiers:
        known = ", ".join(sorted(inv.tiers)) or "none declared in [plan.tiers]"
        raise t.err("tier", f"unknown tier {tier!r} (known: {known})")
    vm = VMPlan(
        name, host, t.str_("owner", "") or "", t.str_("contact", "") or "", tier,
        t.duration("rpo"), t.duration("rto"), t.strs("depends_on"),
        t.int_("boot_group", 1, 0) or 0, _levels(t, "must_survive"),
        t.int_("vcpus", None, 1), t.size("memory"), t.str_("target_dir"),
        t.str_("notes", "") or "")
    _vm_ha(inv, vm, t)
    for key in sorted(set(t.t) - VM_KEYS - HA_VM_KEYS):
        if not key.startswith(OTHER_VM_PREFIXES):
            inv.warnings.append(f"{inv.path}: vm.{name}.{key}: not a plan setting (ignored "
                                f"by the plan; known: {', '.join(sorted(VM_KEYS))})")
    return vm


def _vm_ha(inv: Inventory, vm: VMPlan, t: _T) -> None:
    """The HA keys of one VM: ha, anti_affinity, hosts (+ hosts_rule), ready_check/_delay,
    ha_storage/ha_repository (default: its tier's)."""
    if "ha" in t.t:
        vm.ha = t.bool_("ha")
    vm.anti_affinity = t.str_("anti_affinity")
    vm.affinity_hosts = t.strs("hosts")
    for h in vm.affinity_hosts:
        if h not in inv.hosts:
            raise t.err("hosts", f"unknown host {h!r}")
    vm.hosts_rule = t.choice("hosts_rule", HOSTS_RULES, "must")
    if "hosts_rule" in t.t and not vm.affinity_hosts:
        raise t.err("hosts_rule", "without hosts = [...]")
    vm.ready_check = t.str_("ready_check")
    if vm.ready_check is not None and not READY_CHECK_RE.match(vm.ready_check):
        raise t.err("ready_check", f"expected agent, none, tcp:PORT or exec:COMMAND, got "
                                   f"{vm.ready_check!r}")
    vm.ready_delay_s = t.duration("ready_delay")
    tier = inv.tiers.get(vm.tier) if vm.tier else None  # its defaults; the VM's keys win
    vm.ha_storage = t.choice("ha_storage", HA_STORAGE,
                             (tier.ha_storage if tier else None) or "shared")
    vm.ha_repository = t.str_("ha_repository") if "ha_repository" in t.t \
        else (tier.ha_repository if tier else None)


def check_dependencies(inv: Inventory) -> None:
    """Unknown dependencies, cycles, and boot groups that contradict dependencies."""
    for vm in inv.vms.values():
        for dep in vm.depends_on:
            if dep not in inv.vms:
                raise ConfigError(f"{inv.path}: vm.{vm.name}.depends_on: unknown VM {dep!r}")
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in inv.vms[name].depends_on:
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep] if dep in stack else [name, dep]
                raise ConfigError(f"{inv.path}: vm.{name}.depends_on: dependency cycle "
                                  f"{' → '.join(cycle)}")
            if dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(inv.vms):
        if name not in state:
            visit(name, [name])
    for vm in inv.vms.values():
        for dep in vm.depends_on:
            g = inv.vms[dep].boot_group
            if g > vm.boot_group:
                raise ConfigError(
                    f"{inv.path}: vm.{vm.name}.depends_on: {dep} is in boot group {g}, "
                    f"after {vm.name}'s boot group {vm.boot_group}")


def boot_order(inv: Inventory, names: list[str] | None = None) -> list[str]:
    """VM names by boot group, dependencies first, then by name."""
    pool = set(inv.vms if names is None else names)
    done: list[str] = []

    def add(n: str) -> None:
        if n in done or n not in pool:
            return
        for d in sorted(inv.vms[n].depends_on, key=lambda x: (inv.vms[x].boot_group, x)):
            add(d)
        done.append(n)

    for n in sorted(pool, key=lambda x: (inv.vms[x].boot_group, x)):
        add(n)
    return done


def check_placed(inv: Inventory) -> None:
    """Every VM must sit on a host (from the config or from discovery)."""
    for vm in inv.vms.values():
        if vm.host is None:
            raise ConfigError(
                f"{inv.path}: vm.{vm.name}: in no location: set host = \"<host>\" (one of "
                f"{', '.join(sorted(inv.hosts)) or 'no hosts declared'}); no reachable or "
                "cached host discovery reports it either")
