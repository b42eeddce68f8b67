"""``/etc/vmdr/vmdr.toml`` (or ``--config`` / ``VMDR_CONFIG``): typed, validated settings.

Every error names the file, the key and what was expected.
"""

from __future__ import annotations

import os
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
    raw: dict[str, Any] = field(default_factory=dict)

    def vm(self, name: str) -> VMConfig:
        return self.vms.get(name, VMConfig())


_CONSISTENCY = ("auto", "quiesce", "crash")
_PHASES = ("pre-freeze", "post-thaw", "pre-backup", "post-backup")
# Sections other issues' modules read on their own (validated there).
_PASSTHROUGH = {"plan", "locations", "hosts", "repositories", "vaults", "roles", "verify",
                "ha", "replicas"}


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
    r.finish(allowed_extra=_PASSTHROUGH)
    return cfg
