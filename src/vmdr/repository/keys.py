"""Key slots: the master key wrapped under passphrases, and key files (format.md §3)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmdr.errors import IntegrityError, UnsupportedFormat, UsageError, WrongPassword
from vmdr.repository.crypto import MasterKey, b64, unb64
from vmdr.timeutil import format_time


@dataclass(frozen=True)
class KdfParams:
    name: str = "argon2id"
    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 2

    @classmethod
    def for_tests(cls) -> KdfParams:
        """Cheap parameters for test repositories only (never the default)."""
        return cls(time_cost=1, memory_kib=1024, parallelism=1)


DEFAULT_KDF = KdfParams()
"""What new key slots use unless the caller passes other parameters (tests pass
``KdfParams.for_tests()``)."""


def default_kdf() -> KdfParams:
    return DEFAULT_KDF


# What a key slot may ask for (format.md §3). A tampered slot could otherwise ask for
# terabytes of memory or years of CPU, or overflow the C libraries' integers.
ARGON2_LIMITS = {"time_cost": (1, 100), "memory_kib": (8, 4 << 20), "parallelism": (1, 64)}
SCRYPT_LIMITS = {"n": (2, 1 << 22), "r": (1, 64), "p": (1, 64)}


def _bounded(kdf: dict[str, Any], limits: dict[str, tuple[int, int]]) -> dict[str, int]:
    out = {}
    for k, (lo, hi) in limits.items():
        v = kdf[k]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise IntegrityError(f"a key slot asks for {kdf.get('name')} {k}={v!r}, outside "
                                 f"{lo}..{hi} (tampered?)")
        out[k] = v
    return out


def _derive(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    """The key-encryption key. Raises ``IntegrityError`` for malformed or implausible
    parameters (never ``OverflowError`` or ``MemoryError``)."""
    try:
        salt = unb64(kdf["salt"])
        name = kdf["name"]
        if name == "argon2id":
            a = _bounded(kdf, ARGON2_LIMITS)
            if a["memory_kib"] < 8 * a["parallelism"]:
                raise IntegrityError("a key slot asks for less argon2 memory than its "
                                     "parallelism needs (tampered?)")
            return hash_secret_raw(
                passphrase, salt, time_cost=a["time_cost"], memory_cost=a["memory_kib"],
                parallelism=a["parallelism"], hash_len=32, type=Type.ID,
            )
        if name == "scrypt":
            sc = _bounded(kdf, SCRYPT_LIMITS)
            return hashlib.scrypt(passphrase, salt=salt, n=sc["n"], r=sc["r"], p=sc["p"],
                                  maxmem=256 << 20, dklen=32)
    except (KeyError, TypeError, ValueError, OverflowError, MemoryError) as exc:
        raise IntegrityError(f"a key slot has unusable KDF parameters ({type(exc).__name__}: "
                             f"{exc}) (tampered?)") from None
    raise UnsupportedFormat(f"unknown key derivation function {kdf['name']!r}")


def _aad(repo_id: str, slot_id: str) -> bytes:
    return b"vmdr-keyslot" + repo_id.encode() + slot_id.encode()


def make_slot(
    master: MasterKey, repo_id: str, passphrase: str, label: str, params: KdfParams,
    created: datetime,
) -> tuple[str, bytes]:
    """Return (slot_id, JSON bytes) of a new slot wrapping *master* under *passphrase*,
    made at *created* (the caller's clock)."""
    slot_id = secrets.token_hex(8)
    kdf: dict[str, Any] = {
        "name": params.name, "time_cost": params.time_cost, "memory_kib": params.memory_kib,
        "parallelism": params.parallelism, "salt": b64(os.urandom(16)),
    }
    kek = _derive(passphrase.encode("utf-8"), kdf)
    nonce = os.urandom(12)
    wrapped = AESGCM(kek).encrypt(nonce, master.raw, _aad(repo_id, slot_id))
    doc = {
        "version": 1, "slot": slot_id, "label": label, "created": format_time(created),
        "kdf": kdf, "nonce": b64(nonce), "wrapped": b64(wrapped),
    }
    return slot_id, json.dumps(doc, indent=1).encode()


def parse_slot(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise IntegrityError("a key slot is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise UnsupportedFormat("a key slot has an unknown version")
    return doc


def open_slot(doc: dict[str, Any], repo_id: str, passphrase: str) -> MasterKey | None:
    """Return the master key if *passphrase* opens this slot, else ``None``. Raises
    ``IntegrityError`` for a slot whose KDF parameters are malformed or implausible."""
    kdf = doc.get("kdf")
    if not isinstance(kdf, dict):
        raise IntegrityError(f"key slot {str(doc.get('slot'))[:16]} has no KDF parameters")
    kek = _derive(passphrase.encode("utf-8"), kdf)
    try:
        raw = AESGCM(kek).decrypt(
            unb64(doc["nonce"]), unb64(doc["wrapped"]), _aad(repo_id, doc["slot"])
        )
    except (InvalidTag, KeyError, ValueError, TypeError):
        return None
    return MasterKey(raw)


def keyfile_bytes(master: MasterKey, repo_id: str) -> bytes:
    doc = {"format": "vmdr-keyfile", "version": 1, "repository": repo_id,
           "master_key": b64(master.raw)}
    return (json.dumps(doc, indent=1) + "\n").encode()


def parse_keyfile(data: bytes, repo_id: str | None = None) -> tuple[str, MasterKey]:
    try:
        doc = json.loads(data)
        if doc.get("format") != "vmdr-keyfile":
            raise ValueError
        if doc.get("version") != 1:
            raise UnsupportedFormat("the key file has an unknown version")
        rid, raw = str(doc["repository"]), unb64(doc["master_key"])
    except UnsupportedFormat:
        raise
    except (ValueError, KeyError, AttributeError, TypeError):
        raise UsageError("not a vmdr key file") from None
    if len(raw) != 64:
        raise UsageError("not a vmdr key file (bad key length)")
    if repo_id is not None and rid != repo_id:
        raise WrongPassword("the key file belongs to another repository")
    return rid, MasterKey(raw)
