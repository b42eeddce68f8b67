"""``/etc/vmdr/vmdr.toml`` (or ``--config`` / ``VMDR_CONFIG``): typed, validated settings.

Every error names the file, the key and what was expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from vmdr.errors import ConfigError

DEFAULT_PATH = "/etc/vmdr/vmdr.toml"


@dataclass
class HookConfig:
    scripts: dict[str, str] = field(default_factory=dict)  # phase -> path
    timeout: float = 60.0
    on_failure: str = "abort"  # abort | continue


@dataclass
class VMConfig:
    consistency: str | None = None
    heartbeat: str | None = None  # "agent" or a console regex
    tags: list[str] = field(default_factory=list)
    exclude_disks: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RepositoryRef:
    """What the agent needs of a ``[repositories.NAME]`` entry (the plan reads the rest)."""

    name: str
    url: str
    password_file: str | None = None
    key_file: str | None = None


@dataclass
class AlertConfig:
    webhook: str | None = None
    webhook_format: str = "json"  # json | slack | gotify
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_starttls: bool = True
    smtp_user: str | None = None
    smtp_password_file: str | None = None
    smtp_cafile: str | None = None  # trust this CA for STARTTLS (default: the system's)
    mail_from: str = "vmdr@localhost"
    mail_to: list[str] = field(default_factory=list)


@dataclass
class AgentConfig:
    """``[agent]``: the long-running part (docs/operations.md, "The agent")."""

    listen: str = "127.0.0.1:8780"
    tls_cert: str | None = None
    tls_key: str | None = None
    state: str = "/var/lib/vmdr/agent.db"
    database: str | None = None  # postgresql://… for a fleet
    etcd: list[str] = field(default_factory=list)
    etcd_prefix: str = "/vmdr/"  # several fleets can share one etcd
    host: str | None = None  # default: the system hostname
    jitter_s: float = 0.0
    max_jobs: int = 2  # per host
    max_mirrors: int = 8  # supervised mirrors per host (they take no max_jobs slot)
    repository_jobs: int = 2  # per repository
    history_days: int = 90
    lease_ttl_s: float = 10.0
    metrics_token_file: str | None = None  # /metrics asks for this bearer token (or auditor)
    metrics_token: str | None = field(default=None, repr=False)  # read from the file
    alerts: AlertConfig = field(default_factory=AlertConfig)


@dataclass
class PolicyConfig:
    """``[policies.NAME]``: which VMs, when, where to, how long to keep, what to do after."""

    name: str
    schedule: str
    repository: str
    vms: list[str] = field(default_factory=lambda: ["*"])
    tiers: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    jitter_s: float | None = None
    keep: dict[str, int] = field(default_factory=dict)  # last/hourly/daily/... -> N
    keep_within: str | None = None
    prune_schedule: str = "daily 04:00"
    copy: list[str] = field(default_factory=list)
    verify_schedule: str | None = None
    verify_boot: bool = False
    rpo_s: float | None = None
    mode: str = "auto"  # backup: auto|full|incremental; replicate: snapshot|mirror|sync
    bandwidth: list[str] = field(default_factory=list)  # windows: "mon..fri 08:00..18:00 20M"
    kind: str = "backup"  # backup | replicate (replica cycles / mirrors, vmdr.jobs.mirror)
    to: str | None = None  # replicate: the DR host (else the inventory's replica_to)


@dataclass
class Config:
    path: str | None = None
    repository: str | None = None
    password_file: str | None = None
    key_file: str | None = None
    connect: str = "qemu:///system"
    consistency: str = "auto"
    concurrency: int = 1
    workers: int = 3
    scratch_dir: str = "/var/lib/libvirt/qemu/vmdr"
    append_only: bool = False
    hooks: HookConfig = field(default_factory=HookConfig)
    vms: dict[str, VMConfig] = field(default_factory=dict)
    agent: AgentConfig = field(default_factory=AgentConfig)
    policies: dict[str, PolicyConfig] = field(default_factory=dict)
    repositories: dict[str, RepositoryRef] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def vm(self, name: str) -> VMConfig:
        return self.vms.get(name, VMConfig())


_CONSISTENCY = ("auto", "quiesce", "crash")
_PHASES = ("pre-freeze", "post-thaw", "pre-backup", "post-backup")
# Sections other issues' modules read on their own (validated there).
_PASSTHROUGH = {"plan", "locations", "hosts", "repositories", "vaults", "roles", "verify",
                "ha", "replicas", "recovery", "recovery_plans"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DURATION_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_KEEP = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


class _Reader:
    def __init__(self, path: str, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.table, self.prefix = path, table, prefix
        self.used: set[str] = set()

    def _err(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: expected {expected}, "
                           f"got {self.table[key]!r}")

    def text(self, key: str, default: str | None = None,
            choices: tuple[str, ...] | None = None) -> str | None:
        self.used.add(key)
        if key not in self.table:
            return default
        v = self.table[key]
        if not isinstance(v, str) or (choices and v not in choices):
            raise self._err(key, f"one of {', '.join(choices)}" if choices else "a string")
        return v

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        self.used.add(key)
        v = self.table.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise self._err(key, f"an integer ≥ {minimum}")
        return v

    def duration(self, key: str, default: float | None) -> float | None:
        """``90s``, ``30m``, ``4h``, ``1d12h``, ``2w`` or a number of seconds."""
        self.used.add(key)
        v = self.table.get(key)
        if v is None:
            return default
        if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
            return float(v)
        if isinstance(v, str) and (d := parse_duration(v)) is not None:
            return d
        raise self._err(key, "a duration like 90s, 30m, 4h, 1d12h")

    def boolean(self, key: str, default: bool) -> bool:
        self.used.add(key)
        v = self.table.get(key, default)
        if not isinstance(v, bool):
            raise self._err(key, "true or false")
        return v

    def number(self, key: str, default: float) -> float:
        self.used.add(key)
        v = self.table.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise self._err(key, "a positive number")
        return float(v)

    def strlist(self, key: str) -> list[str]:
        self.used.add(key)
        v = self.table.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._err(key, "a list of strings")
        return list(v)

    def table_(self, key: str) -> dict[str, Any]:
        self.used.add(key)
        v = self.table.get(key, {})
        if not isinstance(v, dict):
            raise self._err(key, "a table")
        return v

    def finish(self, allowed_extra: set[str] | None = None) -> None:
        unknown = set(self.table) - self.used - (allowed_extra or set())
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{self.path}: {self.prefix}{key}: unknown setting")


def parse_duration(text: str) -> float | None:
    """``90s``, ``30m``, ``4h``, ``1d12h``, ``2w`` → seconds; None when invalid."""
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_S[m.group(2)]
        pos = m.end()
    return total if text and pos == len(text) else None


def load(path: str | None = None) -> Config:
    """Load the config from *path*, ``VMDR_CONFIG`` or the default (absent default = empty)."""
    explicit = path or os.environ.get("VMDR_CONFIG")
    p = explicit or DEFAULT_PATH
    if not os.path.exists(p):
        if explicit:
            raise ConfigError(f"{p}: config file not found")
        return Config()
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return parse(doc, p)


def parse(doc: dict[str, Any], path: str = "<config>") -> Config:
    r = _Reader(path, doc)
    cfg = Config(path=path, raw=doc)
    cfg.repository = r.text("repository")
    cfg.password_file = r.text("password_file")
    cfg.key_file = r.text("key_file")
    cfg.connect = r.text("connect", cfg.connect) or cfg.connect
    cfg.consistency = r.text("consistency", "auto", _CONSISTENCY) or "auto"
    cfg.concurrency = r.integer("concurrency", 1, 1)
    cfg.workers = r.integer("workers", 3, 1)
    cfg.scratch_dir = r.text("scratch_dir", cfg.scratch_dir) or cfg.scratch_dir
    r.used.add("append_only")
    cfg.append_only = doc.get("append_only", False)
    if not isinstance(cfg.append_only, bool):
        raise r._err("append_only", "true or false")
    hooks = _Reader(path, r.table_("hooks"), "hooks.")
    cfg.hooks.timeout = hooks.number("timeout", 60.0)
    cfg.hooks.on_failure = hooks.text("on_failure", "abort", ("abort", "continue")) or "abort"
    for phase in _PHASES:
        script = hooks.text(phase)
        if script:
            cfg.hooks.scripts[phase] = script
    hooks.finish()
    for name, table in r.table_("vm").items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: vm.{name}: expected a table")
        v = _Reader(path, table, f"vm.{name}.")
        cfg.vms[name] = VMConfig(
            consistency=v.text("consistency", None, _CONSISTENCY),
            heartbeat=v.text("heartbeat"), tags=v.strlist("tags"),
            exclude_disks=v.strlist("exclude_disks"),
            extra={k: table[k] for k in table if k not in v.used},
        )
        v.finish(allowed_extra=set(table) - v.used)
    _agent(path, r, cfg)
    r.finish(allowed_extra=_PASSTHROUGH)
    return cfg


def _tables(path: str, r: _Reader, key: str) -> dict[str, dict[str, Any]]:
    out = r.table_(key)
    for name, table in out.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {key}.{name}: expected a table")
    return out


def _agent(path: str, r: _Reader, cfg: Config) -> None:
    """``[repositories.*]`` (the keys the agent uses), ``[agent]`` and ``[policies.*]``.
    Schedules are checked by the agent itself (vmdr.agent.calendar) when it starts."""
    for name, table in _tables(path, r, "repositories").items():
        t = _Reader(path, table, f"repositories.{name}.")
        url = t.text("url")
        if not url:
            raise ConfigError(f"{path}: repositories.{name}.url: missing (required)")
        cfg.repositories[name] = RepositoryRef(name, url, t.text("password_file"),
                                               t.text("key_file"))
    a = _Reader(path, r.table_("agent"), "agent.")
    ag = cfg.agent
    ag.listen = a.text("listen", ag.listen) or ag.listen
    host, _, port = ag.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise a._err("listen", "ADDRESS:PORT")
    ag.tls_cert, ag.tls_key = a.text("tls_cert"), a.text("tls_key")
    if bool(ag.tls_cert) != bool(ag.tls_key):
        raise ConfigError(f"{path}: agent.tls_cert and agent.tls_key go together")
    ag.state = a.text("state", ag.state) or ag.state
    ag.database = a.text("database")
    if ag.database and not ag.database.startswith(("postgresql://", "postgresql+psycopg://",
                                                   "sqlite://")):
        raise a._err("database", "a postgresql:// URL")
    ag.etcd = a.strlist("etcd")
    ag.etcd_prefix = a.text("etcd_prefix", ag.etcd_prefix) or ag.etcd_prefix
    if not ag.etcd_prefix.startswith("/") or not ag.etcd_prefix.endswith("/"):
        raise a._err("etcd_prefix", "a key prefix like /vmdr/")
    ag.host = a.text("host")
    ag.jitter_s = a.duration("jitter", 0.0) or 0.0
    ag.max_jobs = a.integer("max_jobs", ag.max_jobs, 1)
    ag.max_mirrors = a.integer("max_mirrors", ag.max_mirrors, 0)
    ag.repository_jobs = a.integer("repository_jobs", ag.repository_jobs, 1)
    ag.history_days = a.integer("history_days", ag.history_days, 1)
    ag.lease_ttl_s = a.duration("lease_ttl", ag.lease_ttl_s) or ag.lease_ttl_s
    ag.metrics_token_file = a.text("metrics_token_file")
    if ag.metrics_token_file:
        try:
            with open(ag.metrics_token_file, encoding="utf-8") as f:
                ag.metrics_token = f.readline().strip() or None
        except OSError as exc:
            raise a._err("metrics_token_file", f"a readable file ({exc.strerror})") from None
        if not ag.metrics_token or len(ag.metrics_token) < 16:
            raise a._err("metrics_token_file", "a file whose first line is a token of 16 or "
                                               "more characters")
    al = _Reader(path, a.table_("alerts"), "agent.alerts.")
    ac = ag.alerts
    ac.webhook = al.text("webhook")
    ac.webhook_format = al.text("webhook_format", "json", ("json", "slack", "gotify")) or "json"
    ac.smtp_host = al.text("smtp_host")
    ac.smtp_port = al.integer("smtp_port", 587, 1)
    ac.smtp_starttls = al.boolean("smtp_starttls", True)
    ac.smtp_user = al.text("smtp_user")
    ac.smtp_password_file = al.text("smtp_password_file")
    ac.smtp_cafile = al.text("smtp_cafile")
    ac.mail_from = al.text("mail_from", ac.mail_from) or ac.mail_from
    ac.mail_to = al.strlist("mail_to")
    al.finish()
    a.finish()
    for name, table in _tables(path, r, "policies").items():
        p = _Reader(path, table, f"policies.{name}.")
        schedule, repo = p.text("schedule"), p.text("repository")
        if not schedule:
            raise ConfigError(f"{path}: policies.{name}.schedule: missing (e.g. \"daily 02:00\")")
        if p.text("kind", "backup", ("backup", "replicate")) == "replicate":
            cfg.policies[name] = _replicate_policy(path, name, p, schedule, repo or "")
            continue
        if not repo:
            raise ConfigError(f"{path}: policies.{name}.repository: missing")
        if repo not in cfg.repositories:
            raise ConfigError(f"{path}: policies.{name}.repository: no [repositories.{repo}]")
        pol = PolicyConfig(name, schedule, repo)
        if "vms" in table:
            pol.vms = p.strlist("vms")
        pol.tiers, pol.hosts = p.strlist("tiers"), p.strlist("hosts")
        pol.jitter_s = p.duration("jitter", None)
        for k in _KEEP:
            if f"keep_{k}" in table:
                pol.keep[k] = p.integer(f"keep_{k}", 0, 0)
        pol.keep_within = p.text("keep_within")
        pol.prune_schedule = p.text("prune_schedule", pol.prune_schedule) or pol.prune_schedule
        pol.copy = p.strlist("copy")
        for c in pol.copy:
            if c not in cfg.repositories:
                raise ConfigError(f"{path}: policies.{name}.copy: no [repositories.{c}]")
        pol.verify_schedule = p.text("verify")
        pol.verify_boot = p.boolean("verify_boot", False)
        pol.rpo_s = p.duration("rpo", None)
        pol.mode = p.text("mode", "auto", ("auto", "full", "incremental")) or "auto"
        bw = table.get("bandwidth")
        pol.bandwidth = [bw] if isinstance(bw, str) else p.strlist("bandwidth")
        p.used.add("bandwidth")  # its rules are checked by the agent (scheduler.schedules)
        p.finish()
        cfg.policies[name] = pol


def _replicate_policy(path: str, name: str, p: _Reader, schedule: str,
                      repo: str) -> PolicyConfig:
    """``kind = "replicate"``: a replica cycle per covered VM on each firing (mode
    snapshot), or a supervised mirror kept running (mirror, sync). ``repository`` is only
    a label here (replicas do not write to one)."""
    pol = PolicyConfig(name, schedule, repo, kind="replicate")
    if "vms" in p.table:
        pol.vms = p.strlist("vms")
    pol.tiers, pol.hosts = p.strlist("tiers"), p.strlist("hosts")
    pol.jitter_s = p.duration("jitter", None)
    pol.rpo_s = p.duration("rpo", None)
    pol.mode = p.text("mode", "snapshot", ("snapshot", "mirror", "sync")) or "snapshot"
    pol.to = p.text("to")
    bw = p.table.get("bandwidth")  # windows as for backups; checked by the scheduler
    pol.bandwidth = [bw] if isinstance(bw, str) else p.strlist("bandwidth")
    p.used.add("bandwidth")
    p.finish()
    return pol
