"""Snapshot references: the one resolver every command uses.

A reference is one of:

``NAME``
    the newest snapshot of NAME. If no snapshot has that name and the text is hex, it
    is read as an ID prefix (below). A name always wins over an ID prefix.
``NAME@latest``
    the newest snapshot of NAME.
``NAME@ID``
    the snapshot of NAME whose ID starts with ID. Only NAME's snapshots are searched:
    a snapshot of another name is never returned, even when NAME does not exist.
``ID``
    the snapshot whose ID starts with ID, across all names.

An ID prefix is hexadecimal and at least :data:`MIN_ID_PREFIX` digits long. A prefix
that matches several snapshots is an error listing them; ``NAME@`` (nothing after the
``@``) is an error, never "latest". A name that holds an ``@`` (made by an older vmdr)
is split at its last ``@``; such snapshots are reachable by ID in any case.

Names (checked when a snapshot is created, :func:`check_name`): not empty, at most
:data:`MAX_NAME_LEN` characters, no ``@``, no control characters (tabs, newlines, escape
sequences), no leading or trailing blanks.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence

from vmdr.errors import IntegrityError, SnapshotNotFound, UsageError
from vmdr.repository.manifest import Snapshot

MIN_ID_PREFIX = 4
MAX_NAME_LEN = 128
_HEX = re.compile(r"[0-9a-fA-F]+")
_SHOWN = 10


def check_name(name: str) -> str:
    """Return *name* if it may name a new snapshot, else raise ``UsageError``."""
    if not name or not name.strip():
        raise UsageError("a snapshot name must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise UsageError(f"snapshot name {name[:40]!r}… is too long (at most {MAX_NAME_LEN} "
                         "characters)")
    if "@" in name:
        raise UsageError(f"snapshot name {name!r} must not contain '@' (it separates a name "
                         "from a snapshot ID)")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise UsageError(f"snapshot name {name!r} must not contain control characters")
    if name != name.strip():
        raise UsageError(f"snapshot name {name!r} must not start or end with blanks")
    return name


def _candidates(snaps: Sequence[Snapshot], damaged: Sequence[str]) -> str:
    items = [f"{s.name}@{s.id[:12]}" for s in snaps] + [f"{d[:12]} (damaged)" for d in damaged]
    more = f", … ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _check_prefix(prefix: str, ref: str) -> str:
    if not _HEX.fullmatch(prefix):
        raise UsageError(f"snapshot reference {ref!r}: {prefix!r} is not a hexadecimal "
                         "snapshot ID (or 'latest')")
    if len(prefix) < MIN_ID_PREFIX:
        raise UsageError(f"snapshot reference {ref!r}: an ID prefix needs at least "
                         f"{MIN_ID_PREFIX} hex digits")
    return prefix.lower()


def _by_prefix(ref: str, prefix: str, pool: Sequence[Snapshot],
               damaged: Mapping[str, str]) -> Snapshot:
    hits = [s for s in pool if s.id.startswith(prefix)]
    bad = sorted(d for d in damaged if d.startswith(prefix))
    if len(hits) == 1 and not bad:
        return hits[0]
    if len(hits) + len(bad) > 1:
        raise UsageError(f"snapshot reference {ref!r} is ambiguous: it matches "
                         f"{_candidates(hits, bad)}; give more digits")
    if bad:
        raise IntegrityError(f"snapshot {bad[0]} is damaged and cannot be used: "
                             f"{damaged[bad[0]]}")
    raise SnapshotNotFound(f"no snapshot {ref!r}")


def resolve_ref(ref: str, snaps: Sequence[Snapshot],
                damaged: Mapping[str, str] | None = None) -> Snapshot:
    """The one snapshot *ref* names among *snaps* (oldest first); *damaged* maps the IDs
    of unreadable manifests to why, so a reference to one says so instead of "not found".
    Raises ``UsageError`` (malformed or ambiguous), ``SnapshotNotFound`` or
    ``IntegrityError`` (the reference names a damaged snapshot)."""
    damaged = damaged or {}
    if not ref or not ref.strip():
        raise UsageError("empty snapshot reference (give NAME, NAME@ID or an ID prefix)")
    if "@" not in ref:
        named = [s for s in snaps if s.name == ref]
        if named:
            return max(named, key=lambda s: (s.time, s.id))
        if _HEX.fullmatch(ref):
            return _by_prefix(ref, _check_prefix(ref, ref), snaps, damaged)
        raise SnapshotNotFound(f"no snapshot named {ref!r}")
    name, _, sel = ref.rpartition("@")
    if not name:
        raise UsageError(f"snapshot reference {ref!r} has no name before the '@'")
    if not sel:
        raise UsageError(f"snapshot reference {ref!r} ends in '@': give NAME, NAME@latest "
                         "or NAME@ID")
    named = [s for s in snaps if s.name == name]
    if sel == "latest":
        if not named:
            raise SnapshotNotFound(f"no snapshot named {name!r}")
        return max(named, key=lambda s: (s.time, s.id))
    prefix = _check_prefix(sel, ref)
    if not named:
        elsewhere = [s for s in snaps if s.id.startswith(prefix)]
        hint = (f"; ID {prefix} belongs to {elsewhere[0].name!r}: write "
                f"{elsewhere[0].name}@{prefix} if you mean that one") if len(elsewhere) == 1 \
            else ""
        if not elsewhere and any(d.startswith(prefix) for d in damaged):
            return _by_prefix(ref, prefix, [], damaged)
        raise SnapshotNotFound(f"no snapshot named {name!r}{hint}")
    return _by_prefix(ref, prefix, named, damaged)
