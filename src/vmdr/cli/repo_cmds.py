"""``vmdr repo …`` and ``vmdr key …``."""

from __future__ import annotations

import argparse
import dataclasses

from vmdr.cli import copy_cmds
from vmdr.cli.common import Globals, emit_json, out, repository
from vmdr.credentials import read_secret, read_secret_bytes, write_private
from vmdr.errors import UsageError
from vmdr.repository import locks as lockmod
from vmdr.repository.keys import parse_keyfile
from vmdr.repository.opening import open_backend_stack, open_repository, prompt_new_passphrase
from vmdr.repository.repo import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, Repository
from vmdr.repository.stats import stats
from vmdr.storage import objectlock
from vmdr.storage.base import Backend
from vmdr.storage.registry import redact
from vmdr.ui.progress import human_bytes


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 4M)") from None


def cmd_init(ns: argparse.Namespace, g: Globals) -> int:
    extra: dict[str, object] = {}

    def new_object_lock(raw: Backend) -> Backend:
        if not ns.object_lock_days:
            return raw
        locked, extra["object_lock"] = objectlock.for_new_repository(
            raw, ns.object_lock_mode, ns.object_lock_days)
        return locked

    master, encryption, chunk_size, level = None, ns.encryption, ns.chunk_size, \
        ns.compression_level
    if ns.from_repo:  # share the source's master key: copies move stored bytes (format §10)
        with copy_cmds.open_from_repo(ns, g) as src:
            master, chunk_size = src.key, src.chunk_size
            encryption = src.config.encryption
            level = src.config.compression_level
    # the configured passphrase (VMDR_PASSWORD, --password-file, VMDR_PASSWORD_FILE, the
    # config) whenever one is set: later commands will open the repository with it
    pw = None if encryption == "none" else g.passphrase.for_new_repository()
    backend = open_backend_stack(g.open_options(), object_lock=new_object_lock)
    with Repository.init(backend, passphrase=pw, encryption=encryption, master=master,
                         chunk_size=chunk_size, compression_level=level,
                         extra_config=extra) as r:
        info = {"repository": r.id, "location": backend.display_url,
                "encryption": r.config.encryption, "chunk_size": r.chunk_size,
                "compression_level": r.config.compression_level,
                "shared_key_with": ns.from_repo and redact(ns.from_repo),
                "object_lock": extra.get("object_lock")}
    if g.json:
        emit_json(info)
    else:
        out(f"created repository {info['repository']} at {info['location']} "
            f"({info['encryption']}, {human_bytes(r.chunk_size)} chunks)")
        if info["shared_key_with"]:
            out(f"shares the master key of {info['shared_key_with']}: 'vmdr copy' between "
                "them moves stored bytes")
        if info["object_lock"]:
            out(f"S3 Object Lock: every object is kept {ns.object_lock_days} days "
                f"({ns.object_lock_mode} mode)")
        if pw:
            out("Keep the passphrase safe, and export the key: vmdr key export FILE")
    return 0


def cmd_stats(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "repo stats") as r:
        st = stats(r)
    if g.json:
        emit_json(st)
        return 0
    out(f"repository   {st['repository']} at {st['location']} ({st['encryption']})")
    out(f"snapshots    {st['snapshots']}")
    out(f"logical      {human_bytes(st['logical_bytes'])} virtual, "
        f"{human_bytes(st['data_bytes'])} data")
    out(f"unique       {human_bytes(st['unique_bytes'])} (dedup {st['dedup_ratio']}×)")
    out(f"stored       {human_bytes(st['stored_bytes'])} in {st['stored_chunks']} chunks "
        f"(compression {st['compression_ratio']}×, total {st['total_ratio']}×)")
    return 0


def cmd_unlock(ns: argparse.Namespace, g: Globals) -> int:
    with open_repository(g.open_options(use_cache=False), None) as r:  # proves the key
        removed = lockmod.unlock(r.backend, remove_all=ns.remove_all)
    if g.json:
        emit_json({"removed": [li.describe() for li in removed]})
    else:
        for li in removed:
            out(f"removed {li.describe()}")
        if not removed:
            out("no stale locks")
    return 0


def cmd_key_list(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "shared", "key list") as r:
        slots = [{"slot": d["slot"], "label": d.get("label", ""), "created": d.get("created"),
                  "kdf": d["kdf"]["name"], "current": d["slot"] == r.slot}
                 for d in r.key_slots()]
    if g.json:
        emit_json(slots)
    else:
        for s in slots:
            mark = "*" if s["current"] else " "
            out(f"{mark} {s['slot']}  {s['label']:<12} {s['kdf']:<9} {s['created']}")
    return 0


def cmd_key_add(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "exclusive", "key add") as r:
        pw = _new_passphrase(ns, "Passphrase for the new key slot: ")
        slot = r.add_key_slot(pw, ns.label)
    out(f"added key slot {slot} ({ns.label})") if not g.json else emit_json({"slot": slot})
    return 0


def _new_passphrase(ns: argparse.Namespace, prompt: str = "New passphrase: ") -> str:
    """A new key slot's passphrase: from --new-password-file, else asked twice (never the
    configured passphrase, which is the one that opened the repository)."""
    if not ns.new_password_file:
        return prompt_new_passphrase(prompt)
    pw = read_secret(ns.new_password_file)
    if not pw:
        raise UsageError(f"{ns.new_password_file}: empty passphrase")
    return pw


def cmd_key_passwd(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "exclusive", "key passwd") as r:
        if r.slot is None:
            raise UsageError("opened with a key file: use 'vmdr key add' to add a passphrase")
        old = r.slot
        label = next((d.get("label", "operator") for d in r.key_slots() if d["slot"] == old),
                     "operator")
        pw = _new_passphrase(ns)
        new = r.add_key_slot(pw, label)
        r.remove_key_slot(old)
    out(f"passphrase changed (slot {old} replaced by {new})") if not g.json else \
        emit_json({"old_slot": old, "slot": new})
    return 0


def cmd_key_remove(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, "exclusive", "key remove") as r:
        r.remove_key_slot(ns.slot)
    out(f"removed key slot {ns.slot}")
    return 0


def cmd_key_export(ns: argparse.Namespace, g: Globals) -> int:
    with repository(g, None) as r:
        write_private(ns.file, r.export_key(), overwrite=ns.force)
    out(f"wrote the repository key to {ns.file} (mode 0600); store it offline")
    return 0


def cmd_key_import(ns: argparse.Namespace, g: Globals) -> int:
    """Regain passphrase access with a key file: adds a new passphrase slot."""
    data = read_secret_bytes(ns.file)
    parse_keyfile(data)
    opts = dataclasses.replace(g.open_options(), passphrase=None, key_file=None, key_data=data)
    with open_repository(opts, "exclusive", "key import") as r:
        slot = r.add_key_slot(_new_passphrase(ns), ns.label)
    out(f"key file accepted; added passphrase slot {slot} ({ns.label})")
    return 0


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    repo = sub.add_parser("repo", help="create and administer repositories",
                          description="Create and administer repositories.")
    rs = repo.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    p = rs.add_parser("init", parents=parents, help="create a new repository",
                      description="Create a new, empty repository at --repo.")
    p.add_argument("--encryption", choices=["aes-256-gcm", "none"], default="aes-256-gcm",
                   help="encryption at rest (default aes-256-gcm)")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size, a power of two (default 4M)")
    p.add_argument("--compression-level", type=int, default=DEFAULT_LEVEL,
                   help=f"zstd level, 0 = off (default {DEFAULT_LEVEL})")
    p.add_argument("--from-repo", metavar="URL",
                   help="share this repository's master key (and chunk size), so that "
                        "'vmdr copy' moves stored bytes without re-encrypting")
    p.add_argument("--from-password-file", metavar="FILE",
                   help="passphrase of --from-repo (env VMDR_FROM_PASSWORD_FILE or "
                        "VMDR_FROM_PASSWORD; default: the new repository's)")
    p.add_argument("--from-key-file", metavar="FILE", help="open --from-repo with a key file")
    p.add_argument("--object-lock-days", type=int, metavar="N",
                   help="S3 only: keep every object immutable for N days (S3 Object Lock; "
                        "creates the bucket with Object Lock if it does not exist)")
    p.add_argument("--object-lock-mode", choices=["governance", "compliance"],
                   default="compliance", help="Object Lock mode (default compliance)")
    p.set_defaults(func=cmd_init)
    p = rs.add_parser("stats", parents=parents, help="sizes, dedup and compression ratios",
                      description="Logical and stored bytes, dedup and compression ratios.")
    p.set_defaults(func=cmd_stats)
    p = rs.add_parser("unlock", parents=parents, help="remove stale locks",
                      description="Remove locks left by vmdr processes that died.")
    p.add_argument("--remove-all", action="store_true",
                   help="remove every lock, also live ones (dangerous)")
    p.set_defaults(func=cmd_unlock)

    key = sub.add_parser("key", help="manage repository keys and passphrases",
                         description="Manage key slots, passphrases and key files.")
    ks = key.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    p = ks.add_parser("list", parents=parents, help="list key slots")
    p.set_defaults(func=cmd_key_list)
    p = ks.add_parser("add", parents=parents, help="add a passphrase slot (e.g. escrow)")
    p.add_argument("--label", default="escrow", help="slot label (default escrow)")
    p.add_argument("--new-password-file", metavar="FILE", help="read the new passphrase here")
    p.set_defaults(func=cmd_key_add)
    p = ks.add_parser("passwd", parents=parents, help="change the passphrase that opened it")
    p.add_argument("--new-password-file", metavar="FILE", help="read the new passphrase here")
    p.set_defaults(func=cmd_key_passwd)
    p = ks.add_parser("remove", parents=parents, help="remove a key slot")
    p.add_argument("slot", help="slot ID (see 'vmdr key list')")
    p.set_defaults(func=cmd_key_remove)
    p = ks.add_parser("export", parents=parents, help="write the master key to a 0600 file")
    p.add_argument("file", help="where to write the key file")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_key_export)
    p = ks.add_parser("import", parents=parents,
                      help="open with a key file and add a new passphrase slot")
    p.add_argument("file", help="a key file from 'vmdr key export'")
    p.add_argument("--label", default="operator", help="slot label (default operator)")
    p.add_argument("--new-password-file", metavar="FILE", help="read the new passphrase here")
    p.set_defaults(func=cmd_key_import)
