"""A TOML table with its dotted key prefix, so every error names file, key and problem."""

from __future__ import annotations

from typing import Any

from vmdr.errors import ConfigError
from vmdr.plan.units import parse_duration, parse_rate, parse_size


class T:
    """One TOML table with its dotted key prefix, for messages that name file and key."""

    def __init__(self, path: str, prefix: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {prefix.rstrip('.')}: expected a table")
        self.path, self.prefix, self.t = path, prefix, table

    def err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {problem}")

    def _bad(self, key: str, expected: str) -> ConfigError:
        return self.err(key, f"expected {expected}, got {self.t[key]!r}")

    def str_(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        if key not in self.t:
            if required:
                raise self.err(key, "missing (required)")
            return default
        v = self.t[key]
        if not isinstance(v, str) or not v:
            raise self._bad(key, "a non-empty string")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.str_(key, default) or default
        if v not in choices:
            raise self._bad(key, f"one of {', '.join(choices)}")
        return v

    def bool_(self, key: str, default: bool = False) -> bool:
        v = self.t.get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def int_(self, key: str, default: int | None = None, minimum: int = 0) -> int | None:
        v = self.t.get(key, default)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise self._bad(key, f"an integer ≥ {minimum}")
        return v

    def num(self, key: str, default: float) -> float:
        v = self.t.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise self._bad(key, "a positive number")
        return float(v)

    def strs(self, key: str) -> tuple[str, ...]:
        v = self.t.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._bad(key, "a list of strings")
        return tuple(v)

    def duration(self, key: str, default: float | None = None) -> float | None:
        if key not in self.t:
            return default
        v = self.t[key]
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return float(v)
        d = parse_duration(v) if isinstance(v, str) else None
        if d is None:
            raise self._bad(key, "a duration such as '90s', '30m', '4h', '1d' or '2w'")
        return d

    def size(self, key: str) -> int | None:
        if key not in self.t:
            return None
        v = self.t[key]
        n = parse_size(v) if isinstance(v, str) else None
        if not n:
            raise self._bad(key, "a size such as '64GiB' or '512MiB'")
        return n

    def rate(self, key: str) -> float | None:
        if key not in self.t:
            return None
        v = self.t[key]
        n = parse_rate(v) if isinstance(v, str) else None
        if not n:
            raise self._bad(key, "a throughput such as '200MiB/s'")
        return n

    def finish(self, known: set[str]) -> None:
        for key in sorted(set(self.t) - known):
            raise self.err(key, "unknown setting")


def tables(path: str, raw: dict[str, Any], section: str) -> dict[str, T]:
    sec = raw.get(section, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{path}: {section}: expected a table")
    return {name: T(path, f"{section}.{name}.", t) for name, t in sec.items()}
