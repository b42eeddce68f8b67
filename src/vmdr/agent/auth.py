"""API tokens, dashboard users and roles.

* A token is ``vmdr_<id>_<secret>``: 32 random bytes, shown once. Only its SHA-256 is stored
  (a token has full entropy, so a slow hash buys nothing; a password does not, so users'
  passwords get Argon2id).
* Roles nest: ``auditor`` reads; ``operator`` also runs backups, verifications, copies and
  restores to new names; ``admin`` also does destructive work (restore in place, forget,
  prune, keys, tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from vmdr.agent.clock import wall
from vmdr.agent.history import History
from vmdr.errors import UsageError

ROLES = ("auditor", "operator", "admin")
_RANK = {r: i for i, r in enumerate(ROLES)}
# OWASP's Argon2id minimum (19 MiB, 2 passes): the agent's idle budget is 60 MB, and the
# default (64 MiB) would hold that much per concurrent login
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
_dummy: list[str] = []


def _dummy_hash() -> str:
    """A fixed hash to verify against when the user does not exist: same time either way."""
    if not _dummy:
        _dummy.append(_hasher.hash("vmdr-no-such-user"))
    return _dummy[0]


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    kind: str  # token | user | session

    def can(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(history: History, role: str, name: str | None = None,
                 ttl_s: float | None = None) -> str:
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}")
    tid = secrets.token_hex(4)
    token = f"vmdr_{tid}_{secrets.token_urlsafe(32)}"
    now = wall()
    history.add_token(tid, name or f"{role}-{tid}", role, digest(token), now,
                      now + ttl_s if ttl_s else None)
    return token


def check_token(history: History, token: str, now: float | None = None) -> Principal | None:
    if not token.startswith("vmdr_") or len(token) > 200:
        return None
    row = history.token_by_hash(digest(token))
    if row is None or not hmac.compare_digest(row["hash"], digest(token)):
        return None
    if row["expires"] is not None and (now or wall()) >= row["expires"]:
        return None
    return Principal(str(row["name"]), str(row["role"]), "token")


def add_user(history: History, name: str, role: str, password: str) -> None:
    if role not in ROLES:
        raise UsageError(f"role must be one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(
            ".", "").isalnum():
        raise UsageError("user names are letters, digits, '-', '_' and '.'")
    if len(password) < 8:
        raise UsageError("a password needs at least 8 characters")
    history.set_user(name, role, _hasher.hash(password), wall())


def check_user(history: History, name: str, password: str) -> Principal | None:
    row = history.user(name) if name else None
    try:
        _hasher.verify(row["hash"] if row else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    return Principal(name, str(row["role"]), "user") if row else None
