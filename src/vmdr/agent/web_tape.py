"""The dashboard's tape page ``/tape``: pools, every tape with where it is (drive, slot,
import/export slot, vault), media sets with their snapshots, recent tape activity (sets
written, vault moves) and the vault checklist — read from the tape catalog in the agent's
database (``vmdr tape …`` keeps it there when the agent has one).

Where a tape in the library sits comes from the changer itself when the agent's
environment names the library (``VMDR_TAPE_LIBRARY``, as for the ``vmdr tape`` commands);
otherwise the catalog's "library" is shown. ``/tape/checklist.txt`` is the same printable
checklist as ``vmdr tape vault``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from vmdr.agent.daemon import Agent
from vmdr.agent.web import _need, page
from vmdr.errors import VmdrError
from vmdr.jobs.tape_media import vault_checklist, vault_report
from vmdr.tape.catalog import Catalog
from vmdr.tape.catalog_db import DbCatalogStore
from vmdr.timeutil import format_time, utcnow

log = logging.getLogger(__name__)
_STORES: dict[int, DbCatalogStore] = {}


def catalog(a: Agent) -> Catalog:
    """The tape catalog in the agent's database (empty when no tape job wrote one)."""
    eng = a.history.engine
    store = _STORES.get(id(eng))
    if store is None:
        store = _STORES[id(eng)] = DbCatalogStore(eng)
    return store.load()


def changer_places() -> tuple[dict[str, str], str | None]:
    """Barcode → "drive N" / "slot N" / "import/export slot N" from the changer named by
    ``VMDR_TAPE_LIBRARY``; and why not, when it cannot be asked."""
    spec = os.environ.get("VMDR_TAPE_LIBRARY")
    if not spec:
        return {}, None
    from vmdr.tape.devices import open_library

    try:
        lib = open_library(spec, ready_timeout=5)
        try:
            if lib.changer is None:
                return {}, None
            st = lib.changer.status()
        finally:
            lib.close()
    except VmdrError as exc:
        return {}, f"the tape library did not answer: {exc.message}"
    where = {}
    for e in [*st.drives, *st.slots]:
        if e.full and e.barcode:
            kind = {"drive": "drive", "slot": "slot", "ie": "import/export slot"}[e.kind]
            where[e.barcode] = f"{kind} {e.number}"
    return where, None


def _t(d: datetime | None) -> str:
    return format_time(d)[:16].replace("T", " ") if d else "—"


def tape_view(cat: Catalog, places: dict[str, str], now: datetime) -> dict[str, Any]:
    """Plain rows for the template (pure: unit-tested without an agent)."""
    lines = {v.label: v for v in vault_report(cat, now)}
    tapes = []
    for m in sorted(cat.media.values(), key=lambda m: (m.pool, m.label)):
        v = lines.get(m.label)
        if m.in_vault:
            where = f"vault {m.in_vault}"
        elif m.location == "library":
            where = places.get(m.label, "library")
        else:
            where = m.location
        state = ("full" if m.full else "written" if m.media_set else "labelled")
        tapes.append({"label": m.label, "pool": m.pool, "set": (m.media_set or "")[:8],
                      "seq": m.seq if m.media_set else "", "state": state, "where": where,
                      "offsite": bool(m.in_vault), "written": _t(m.last_written),
                      "until": (_t(v.retained_until) if v and v.retained_until else
                                "forever" if v and v.last_written else "—"),
                      "action": v.action if v else "stay"})
    sets: list[dict[str, Any]] = []
    for ms in sorted(cat.sets.values(), key=lambda s: s.created, reverse=True):
        media = cat.set_media(ms.uuid)
        locs = {m.location for m in media}
        snaps = sorted((s for s in cat.snapshots.values() if s.media_set == ms.uuid),
                       key=lambda s: s.time)
        sets.append({"uuid": ms.uuid[:8], "pool": ms.pool, "created": _t(ms.created),
                     "written": _t(ms.last_written), "closed": ms.closed,
                     "tapes": ", ".join(m.label for m in media),
                     "where": (next(iter(locs)).replace("vault:", "vault ") if len(locs) == 1
                               else "split: " + ", ".join(sorted(locs))) if locs else "—",
                     "snapshots": [f"{s.name}@{s.id[:8]}" for s in snaps],
                     "bytes": sum(s.size for s in snaps)})
    pools = []
    for p in sorted(cat.pools.values(), key=lambda p: p.name):
        mine = [m for m in cat.media.values() if m.pool == p.name]
        cur = cat.current_set(p.name)
        pools.append({"name": p.name, "allocation": p.allocation, "retention": p.retention,
                      "worm": p.worm, "sealed": bool(p.key_file), "vault": p.vault or "—",
                      "tapes": len(mine), "offsite": sum(1 for m in mine if m.in_vault),
                      "current": cur.uuid[:8] if cur else "—"})
    written: list[dict[str, str]] = [
        {"when": s["written"], "what": f"set {s['uuid']} ({s['pool']}) on {s['tapes']}: "
                                       f"{', '.join(s['snapshots']) or 'no snapshots'}"}
        for s in sets if s["written"] != "—"]
    moves = [{"when": _t(e.time), "what": f"{e.tape} → "
              f"{e.to.replace('vault:', 'vault ') if e.to != 'library' else 'the library'}"}
             for e in cat.history]
    activity = sorted(written + moves, key=lambda r: r["when"], reverse=True)[:20]
    todo = [v for v in lines.values() if v.action != "stay"]
    return {"pools": pools, "tapes": tapes, "sets": sets, "activity": activity,
            "todo": [{"action": v.action, "label": v.label, "pool": v.pool,
                      "set": (v.media_set or "-")[:8]} for v in todo]}


async def tape_page(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    cat = await asyncio.to_thread(catalog, a)
    places, lib_err = await asyncio.to_thread(changer_places)
    return page(request, "tape.html", lib_err=lib_err, **tape_view(cat, places, utcnow()))


async def checklist(request: Request) -> Response:
    _need(request, "auditor")
    a: Agent = request.app.state.agent
    cat = await asyncio.to_thread(catalog, a)
    now = utcnow()
    return PlainTextResponse(vault_checklist(vault_report(cat, now), now))


routes = [
    Route("/tape", tape_page),
    Route("/tape/checklist.txt", checklist),
]
