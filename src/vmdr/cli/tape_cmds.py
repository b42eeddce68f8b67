"""``vmdr tape …`` (pools, labels, inventory, backup, restore, catalog, vault) and
``vmdr export``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from vmdr.cli.common import Globals, emit_json, out, repository
from vmdr.credentials import read_secret_bytes
from vmdr.errors import UsageError
from vmdr.tape.catalog import DEFAULT_DIR, CatalogBackend, open_catalog
from vmdr.tape.library import Library
from vmdr.tape.media import Pool
from vmdr.timeutil import utcnow
from vmdr.ui.progress import human_bytes


def catalog_spec(explicit: str | None, g: Globals) -> str:
    """Where the catalog lives: --tape-dir / VMDR_TAPE_DIR (a directory or a database
    URL); else the agent's database when there is one (``[agent] database``, or its SQLite
    state file when it exists); else the local directory."""
    spec = explicit or os.environ.get("VMDR_TAPE_DIR")
    if spec:
        return spec
    ag = g.config.agent
    if ag.database:
        return ag.database
    if os.path.exists(ag.state):
        return f"sqlite:///{os.path.abspath(ag.state)}"
    return DEFAULT_DIR


def _store(ns: argparse.Namespace, g: Globals) -> CatalogBackend:
    return open_catalog(catalog_spec(ns.tape_dir, g))


@contextlib.contextmanager
def _library(ns: argparse.Namespace) -> Iterator[Library]:
    from vmdr.tape.devices import open_library

    spec = ns.library or os.environ.get("VMDR_TAPE_LIBRARY")
    if not spec:
        raise UsageError("no tape library: give --library (virtual:DIR, mtx:CHANGER,DRIVE, "
                         "sg:CHANGER,DRIVE) or set VMDR_TAPE_LIBRARY")
    lib = open_library(spec, ns.ready_timeout)
    try:
        yield lib
    finally:
        lib.close()


def _keyfile(g: Globals) -> bytes | None:
    return read_secret_bytes(g.key_file) if g.key_file else None


# --------------------------------------------------------------------- handlers
def cmd_pool(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape_media import add_pool

    store = _store(ns, g)
    if ns.action == "add":
        if not ns.name:
            raise UsageError("give the pool's name")
        p = add_pool(store, Pool(ns.name, ns.allocation, ns.retention, ns.worm, ns.pool_key_file,
                                 ns.vault), ns.maxslot)
        out(f"pool {p.name}: allocation {p.allocation}, retention {p.retention}"
            f"{', WORM' if p.worm else ''}{', sealed' if p.key_file else ''}"
            f"{f', vault {p.vault}' if p.vault else ''}")
        return 0
    pools = store.load().pools
    if g.json:
        emit_json([p.to_doc() for p in pools.values()])
    for p in pools.values():
        if not g.json:
            out(f"{p.name:<12} {p.allocation:<10} retention {p.retention:<8} "
                f"{'WORM ' if p.worm else ''}{f'vault {p.vault}' if p.vault else ''}")
    return 0


def cmd_virtual_create(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.plan.units import parse_size
    from vmdr.tape.virtual import VirtualLibrary

    size = parse_size(ns.capacity)
    if not size:
        raise UsageError(f"bad --capacity {ns.capacity!r} (e.g. 1G, 512M)")
    lib = VirtualLibrary.create(ns.dir, ns.slots, ns.ie_slots, size)
    for i in range(ns.tapes):
        lib.add_tape(f"{ns.prefix}{i + 1:03d}L8", i + 1)
    if ns.cleaning:
        lib.add_tape("CLN001L1", ns.slots)
    out(f"virtual library {ns.dir}: {ns.slots} slots, {ns.ie_slots} import/export, "
        f"{ns.tapes} tapes of {ns.capacity} (a demo back end, not tested hardware)")
    out(f"use it with --library virtual:{os.path.abspath(ns.dir)}")
    return 0


def cmd_label(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape_media import label_tape

    with _library(ns) as lib:
        slots = ns.slot or [None]
        for slot in slots:
            m = label_tape(lib, _store(ns, g), ns.pool, slot=slot, label=ns.label, force=ns.force)
            if len(slots) > 1 or slot is not None:
                lib.unload()
            if g.json:
                emit_json(m.to_doc())
            else:
                out(f"labelled {m.label} for pool {m.pool} (uuid {m.uuid})")
    return 0


def cmd_inventory(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape_media import inventory

    with _library(ns) as lib:
        rows = inventory(lib, _store(ns, g), ns.read_labels)
    if g.json:
        emit_json(rows)
        return 0
    out(f"{'ELEMENT':<8} {'NO':>3} {'BARCODE':<10} {'POOL':<10} {'SET':<9} {'SEQ':>3} STATE")
    for r in rows:
        state = ("empty" if not r["full"] else "cleaning" if r["cleaning"] else
                 "full tape" if r.get("tape_full") else r.get("error") or
                 ("written" if r.get("media_set") else "labelled" if r.get("pool") else
                  "unknown"))
        out(f"{r['element']:<8} {r['number']:>3} {r.get('label') or r['barcode'] or '-':<10} "
            f"{r.get('pool') or '-':<10} {(r.get('media_set') or '-')[:8]:<9} "
            f"{r.get('seq', '-') if r.get('media_set') else '-':>3} {state}")
    return 0


def cmd_backup(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape import backup_to_tape, select_snapshots

    with repository(g, "shared", "tape backup") as r, _library(ns) as lib:
        snaps = select_snapshots(r, ns.vms, ns.all)
        res = backup_to_tape(r, lib, _store(ns, g), ns.pool, snaps, g.events)
    if g.json:
        emit_json(res.as_dict())
        return 0
    rate = res.bytes / res.seconds if res.seconds else 0
    out(f"media set {res.media_set[:8]} on {', '.join(res.tapes)}: {len(res.snapshots)} "
        f"snapshots, {res.chunks_written} chunks written ({res.chunks_skipped} already on the "
        f"set), {human_bytes(res.bytes)} at {human_bytes(rate)}/s")
    if res.tapes_full:
        out(f"full tapes: {', '.join(res.tapes_full)}")
    return 0


def cmd_restore(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape import restore_from_tape
    from vmdr.storage.registry import open_backend, redact

    target = ns.to or g.repo
    if not target:
        raise UsageError("give --to URL (the repository to restore into; created when empty)")
    keyfile = _keyfile(g)
    opener = None
    if keyfile is None:
        from vmdr.repository.repo import Repository
        from vmdr.storage.base import Backend

        def opener(b: Backend) -> Repository:
            return Repository.open(b, passphrase=g.passphrase, use_cache=False)
    with _library(ns) as lib:
        res = restore_from_tape(lib, _store(ns, g), open_backend(target), keyfile, ns.media_set,
                                ns.snapshot, ns.pool_key_file, g.events, opener)
    if g.json:
        emit_json(res.as_dict())
    else:
        out(f"restored media set {res.media_set[:8]} from {', '.join(res.tapes)} into "
            f"{redact(target)}: {res.chunks} chunks, {len(res.snapshots)} snapshots, "
            f"{human_bytes(res.bytes)} in {res.seconds:.1f}s")
    return 0


def cmd_catalog(ns: argparse.Namespace, g: Globals) -> int:
    store = _store(ns, g)
    if ns.rebuild:
        from vmdr.jobs.tape import rebuild_catalog

        with _library(ns) as lib:
            res = rebuild_catalog(lib, store, _keyfile(g), not ns.quick, ns.pool_key_file)
        if g.json:
            emit_json(res.as_dict())
        else:
            out(f"catalog rebuilt from {len(res.tapes)} tapes ({', '.join(res.tapes)}): "
                f"{res.sets} media sets, {res.snapshots} snapshots, read "
                f"{human_bytes(res.bytes_read)} in {res.seconds:.1f}s")
            for b in res.unreadable:
                out(f"unreadable label: {b}")
        return 0
    cat = store.load()
    if g.json:
        emit_json(cat.to_doc())
        return 0
    for ms in sorted(cat.sets.values(), key=lambda s: s.created):
        tapes = ", ".join(cat.media[u].label for u in ms.media if u in cat.media)
        out(f"set {ms.uuid[:8]} pool {ms.pool} {'closed' if ms.closed else 'open':<6} "
            f"tapes {tapes}")
        for s in sorted(cat.snapshots.values(), key=lambda s: s.time):
            if s.media_set == ms.uuid:
                tape = cat.media[s.tape].label if s.tape in cat.media else s.tape[:8]
                out(f"    {s.name}@{s.id[:8]} {s.time[:19]} {human_bytes(s.size)} on {tape} "
                    f"file {s.file}")
    return 0


def cmd_export_tapes(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape_media import export_tapes

    with _library(ns) as lib:
        moves = export_tapes(lib, _store(ns, g), ns.vault, ns.media_set, ns.labels)
    for m in moves:
        out(f"{m.label}: {'to import/export slot ' + str(m.slot) if m.slot else 'out'}, "
            f"recorded in vault {ns.vault}")
    return 0


def cmd_import_tapes(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape_media import import_tapes

    with _library(ns) as lib:
        moves = import_tapes(lib, _store(ns, g), ns.labels)
    for m in moves:
        out(f"{m.label}: back in the library{f' (slot {m.slot})' if m.slot else ''}")
    return 0


def cmd_vault(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.tape_media import vault_checklist, vault_report

    now = utcnow()
    lines = vault_report(_store(ns, g).load(), now)
    if g.json:
        emit_json([v.as_dict() for v in lines])
    else:
        sys.stdout.write(vault_checklist(lines, now))
    return 0


def cmd_export(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.jobs.export import export_snapshot

    with repository(g, "shared", "export") as r:
        snap = r.resolve(ns.snapshot)
        to_stdout = ns.output == "-"
        res = export_snapshot(r, snap, ns.format, ns.output,
                              sys.stdout.buffer if to_stdout else None, ns.disk, ns.force,
                              g.events)
    if not to_stdout:
        if g.json:
            emit_json(res)
        else:
            out(f"exported {snap.name}@{snap.short_id} as {ns.format} to {ns.output}")
    return 0


# --------------------------------------------------------------------- parser
def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    dev = argparse.ArgumentParser(add_help=False)
    d = dev.add_argument_group("tape options")
    d.add_argument("--library", metavar="SPEC",
                   help="virtual:DIR, mtx:/dev/sgN,/dev/nstN or sg:/dev/sgN,/dev/sgM "
                        "(env VMDR_TAPE_LIBRARY)")
    d.add_argument("--tape-dir", metavar="DIR|URL",
                   help="the catalog: a directory, or a database URL (sqlite:///FILE, "
                        "postgresql://…); env VMDR_TAPE_DIR; default the agent's database "
                        f"when there is one, else {DEFAULT_DIR}")
    d.add_argument("--ready-timeout", type=float, default=120.0, metavar="S",
                   help="give up when the drive is not ready after S seconds (default 120)")
    pp = [*parents, dev]

    t = sub.add_parser("tape", help="tape pools, labels, backup to tape, the vault",
                       description="Write repository snapshots to tape media sets, keep a "
                                   "catalog, rebuild it from the tapes alone, and track "
                                   "tapes sent to a vault.")
    s = t.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    p = s.add_parser("pool", parents=pp, help="create, change or list media pools")
    p.add_argument("action", choices=["add", "list"])
    p.add_argument("name", nargs="?")
    p.add_argument("--allocation", default="continue",
                   help="continue | always | rotation | daily | weekly | monthly | weekdays "
                        "such as mon,thu (default continue)")
    p.add_argument("--retention", default="30d",
                   help="keep | overwrite | a duration like 30d, 8w, 1y (default 30d)")
    p.add_argument("--worm", action="store_true", help="never rewrite a written tape")
    p.add_argument("--pool-key-file", metavar="FILE",
                   help="seal every payload with this pool key (0600 file) as well")
    p.add_argument("--vault", help="the vault this pool's full sets go to")
    p.add_argument("--maxslot", type=int, help="rotation: the highest slot of the rotation")
    p.set_defaults(func=cmd_pool)

    p = s.add_parser("virtual-create", parents=pp,
                     help="create a file-backed virtual library (demo, not hardware)")
    p.add_argument("dir")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--ie-slots", type=int, default=2)
    p.add_argument("--tapes", type=int, default=4, help="blank tapes in slots 1..N")
    p.add_argument("--capacity", default="1G", help="bytes per tape (default 1G)")
    p.add_argument("--prefix", default="VMD", help="barcode prefix (default VMD)")
    p.add_argument("--cleaning", action="store_true", help="a CLN tape in the last slot")
    p.set_defaults(func=cmd_virtual_create)

    p = s.add_parser("label", parents=pp, help="write a vmdr label on a tape")
    p.add_argument("--pool", required=True)
    p.add_argument("--slot", type=int, action="append",
                   help="the slot's tape (repeatable; default: the tape in the drive)")
    p.add_argument("--label", help="a name, for tapes without a barcode")
    p.add_argument("--force", action="store_true",
                   help="relabel a vmdr tape (still refused while retention protects it)")
    p.set_defaults(func=cmd_label)

    p = s.add_parser("inventory", parents=pp, help="slots, barcodes and what the catalog knows")
    p.add_argument("--read-labels", action="store_true",
                   help="load every tape and read its label (slow; learns unknown tapes)")
    p.set_defaults(func=cmd_inventory)

    p = s.add_parser("backup", parents=pp, help="write snapshots to a pool's media set",
                     description="Write the latest snapshot of each VM (or NAME@ID) from the "
                                 "repository to the pool's current media set: the encrypted "
                                 "chunks the set lacks, the manifests, a catalog per tape.")
    p.add_argument("vms", nargs="*", metavar="VM")
    p.add_argument("--all", action="store_true", help="the latest snapshot of every name")
    p.add_argument("--pool", required=True)
    p.set_defaults(func=cmd_backup)

    p = s.add_parser("restore", parents=pp,
                     help="bring a media set back into a repository",
                     description="Recreate the repository (same id, config and key slots) "
                                 "or fill an existing one from a media set. With only the "
                                 "tapes and the exported key: --key-file.")
    p.add_argument("snapshot", nargs="?", help="NAME[@ID]: the set holding its latest copy")
    p.add_argument("--media-set", help="a media set uuid (prefix)")
    p.add_argument("--to", metavar="URL", help="the repository to restore into (default -r)")
    p.add_argument("--pool-key-file", metavar="FILE", help="the pool key, for sealed pools")
    p.set_defaults(func=cmd_restore)

    p = s.add_parser("catalog", parents=pp, help="show the catalog, or rebuild it from tapes")
    p.add_argument("--rebuild", action="store_true",
                   help="read every tape in the library and recreate the catalog")
    p.add_argument("--quick", action="store_true",
                   help="with --rebuild: read each tape's own catalog, not every frame")
    p.add_argument("--pool-key-file", metavar="FILE", help="the pool key, for sealed pools")
    p.set_defaults(func=cmd_catalog)

    p = s.add_parser("export", parents=pp,
                     help="move tapes to the import/export slots, recorded as in a vault")
    p.add_argument("labels", nargs="*", metavar="LABEL")
    p.add_argument("--media-set", help="every tape of this media set")
    p.add_argument("--vault", required=True)
    p.set_defaults(func=cmd_export_tapes)

    p = s.add_parser("import", parents=pp, help="record tapes back from the vault")
    p.add_argument("labels", nargs="+", metavar="LABEL")
    p.set_defaults(func=cmd_import_tapes)

    p = s.add_parser("vault", parents=pp,
                     help="printable checklist: which tapes are where, what to carry")
    p.set_defaults(func=cmd_vault)

    e = sub.add_parser("export", parents=parents,
                       help="stream a snapshot as raw, qcow2 or tar for other software",
                       description="Write a snapshot (disks, and domain XML in tar) to a file "
                                   "or stdout, for Bareos, NetBackup, TSM and the like.")
    e.add_argument("snapshot", help="NAME[@ID|@latest] or an ID prefix")
    e.add_argument("--format", choices=["raw", "qcow2", "tar"], default="tar")
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="a file, or - for stdout")
    e.add_argument("--disk", help="raw/qcow2: which disk of a multi-disk snapshot")
    e.add_argument("--force", action="store_true", help="overwrite an existing file")
    e.set_defaults(func=cmd_export)
