"""Tapes as copies in the DR plan, from the tape catalog's real history.

A repository declared with ``url = "tape:/var/lib/vmdr/tape"`` (the tape directory, as
``VMDR_TAPE_DIR``, or the agent's database: ``tape:sqlite:////var/lib/vmdr/agent.db``,
``tape:postgresql://…``; ``?pool=NAME`` limits it to one pool) and ``vault = "NAME"`` holds the
VM snapshots whose media set is entirely in that vault now — where ``vmdr tape export``
recorded the tapes, the same records ``vmdr tape vault`` prints. Without ``vault`` it holds
the sets whose tapes are all in the library. A set with one tape elsewhere does not count:
it cannot be restored from that place alone.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode

from vmdr.plan.history import Copy
from vmdr.tape.catalog import DEFAULT_DIR, Catalog, open_catalog


def is_tape_url(url: str) -> bool:
    return url.startswith("tape:")


def catalog_of(url: str) -> tuple[Catalog, str | None]:
    """The catalog a ``tape:`` URL names, and its pool filter."""
    base, _, query = url[5:].partition("?")
    q = parse_qs(query)
    pool = q.pop("pool", [None])[0]
    rest = urlencode(q, doseq=True)  # a database URL's own options stay
    spec = (base + (f"?{rest}" if rest else "")) or DEFAULT_DIR
    return open_catalog(spec).load(), pool


def tape_copies(cat: Catalog, repo: str, vault: str | None, pool: str | None = None
                ) -> list[Copy]:
    where = f"vault:{vault}" if vault else "library"
    out = []
    for s in sorted(cat.snapshots.values(), key=lambda s: s.time):
        ms = cat.sets.get(s.media_set)
        if ms is None or (pool and ms.pool != pool):
            continue
        tapes = cat.set_media(ms.uuid)
        if not tapes or any(m.location != where for m in tapes):
            continue
        from vmdr.timeutil import parse_time

        out.append(Copy(repo, s.name, s.id, parse_time(s.time), s.size))
    return out
