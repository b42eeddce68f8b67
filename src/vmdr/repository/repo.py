"""The repository: config, keys, chunks, snapshots and attachments over a backend."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import blake3

from vmdr.errors import (
    IntegrityError,
    ObjectNotFound,
    ObjectNotFoundInRepo,
    RepositoryExists,
    RepositoryNotFound,
    SnapshotNotFound,
    UnsupportedFormat,
    UsageError,
    VmdrError,
    WrongPassword,
)
from vmdr.repository import manifest
from vmdr.repository.cache import Cache
from vmdr.repository.crypto import (
    HOLE,
    TYPE_ATTACHMENT,
    TYPE_CHUNK,
    TYPE_SNAPSHOT,
    MasterKey,
    ObjectCodec,
)
from vmdr.repository.keys import (
    KdfParams,
    default_kdf,
    keyfile_bytes,
    make_slot,
    open_slot,
    parse_keyfile,
    parse_slot,
)
from vmdr.repository.locks import Lock
from vmdr.repository.manifest import Snapshot
from vmdr.storage.base import Backend, ObjectInfo
from vmdr.timeutil import Clock, format_time, parse_time, utcnow

log = logging.getLogger(__name__)
CONFIG_NAME = "vmdr-repo"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_LEVEL = 3
GENERATION_NAME = "state/generation"
TEMP_PREFIXES = ("data", "snapshots", "attachments", "keys", "state")
PassphraseSource = Callable[[], str]


def chunk_name(oid: bytes) -> str:
    h = oid.hex()
    return f"data/{h[:2]}/{h}"


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "mac"},
                      sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RepoConfig:
    id: str
    encryption: str
    chunk_size: int
    compression_level: int
    created: str

    def to_doc(self) -> dict[str, Any]:
        return {"format": "vmdr-repository", "version": FORMAT_VERSION, "id": self.id,
                "created": self.created, "encryption": self.encryption,
                "chunk_size": self.chunk_size, "compression": "zstd",
                "compression_level": self.compression_level}


def _read_config(backend: Backend) -> dict[str, Any]:
    try:
        raw = backend.get(CONFIG_NAME)
    except ObjectNotFound:
        raise RepositoryNotFound(f"no vmdr repository at {backend.display_url}") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != "vmdr-repository":
            raise ValueError
    except ValueError:
        raise RepositoryNotFound(f"{backend.display_url} is not a vmdr repository") from None
    if doc.get("version") != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"repository format version {doc.get('version')} is not supported by this vmdr "
            f"(it reads version {FORMAT_VERSION}); upgrade vmdr"
        )
    return doc


def _open_cache(repo_id: str) -> Cache | None:
    """The local cache, or none when it cannot be opened (a full or read-only disk): it is
    advisory, so its absence costs speed, never a backup or a restore."""
    try:
        return Cache(repo_id)
    except (sqlite3.Error, OSError) as exc:
        log.warning("working without the local cache (%s)", exc)
        return None


class Repository:
    """An open repository. Thread-safe for chunk and snapshot operations."""

    def __init__(
        self, backend: Backend, config: RepoConfig, key: MasterKey | None,
        slot: str | None = None, clock: Clock = utcnow, use_cache: bool = True,
    ) -> None:
        self.backend = backend
        self.config = config
        self.key = key
        self.slot = slot
        self.clock = clock
        self.codec = ObjectCodec(key, config.compression_level)
        self.cache = _open_cache(config.id) if use_cache else None
        #: snapshot ID -> why its manifest could not be read (filled by list_snapshots)
        self.damaged: dict[str, str] = {}
        self._on_close: list[Callable[[], None]] = []
        self._chunk_list_checked = False
        self._chunk_check_lock = threading.Lock()
        self._generation_at_open = self.generation()
        if self.cache:
            self.cache.sync_generation(self._generation_at_open)

    # ----------------------------------------------------------------- lifecycle
    @property
    def id(self) -> str:
        return self.config.id

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    @classmethod
    def init(
        cls, backend: Backend, *, passphrase: str | None, encryption: str = "aes-256-gcm",
        chunk_size: int = DEFAULT_CHUNK_SIZE, compression_level: int = DEFAULT_LEVEL,
        kdf: KdfParams | None = None, master: MasterKey | None = None,
        label: str = "operator", clock: Clock = utcnow,
        extra_config: dict[str, Any] | None = None,
    ) -> Repository:
        if encryption not in ("aes-256-gcm", "none"):
            raise UsageError(f"unknown encryption {encryption!r} (aes-256-gcm or none)")
        if chunk_size & (chunk_size - 1) or not (64 << 10) <= chunk_size <= (64 << 20):
            raise UsageError("chunk size must be a power of two from 64 KiB to 64 MiB")
        if not 0 <= compression_level <= 22:
            raise UsageError("compression level must be 0 (off) to 22")
        if encryption != "none" and not passphrase:
            raise UsageError("an encrypted repository needs a passphrase")
        backend.create()
        if backend.exists(CONFIG_NAME):
            raise RepositoryExists(f"a repository already exists at {backend.display_url}")
        cfg = RepoConfig(secrets.token_hex(16), encryption, chunk_size, compression_level,
                         format_time(clock()))
        doc = {**cfg.to_doc(), **(extra_config or {})}  # e.g. object_lock (format.md §2)
        key: MasterKey | None = None
        slot: str | None = None
        if encryption != "none":
            if not passphrase:
                raise UsageError("an encrypted repository needs a passphrase")
            key = master or MasterKey.generate()
            doc["mac"] = blake3.blake3(_canonical(doc), key=key.mac_key).hexdigest()
            slot, slot_doc = make_slot(key, cfg.id, passphrase, label, kdf or default_kdf(),
                                       clock())
            backend.put(f"keys/{slot}", slot_doc)
        backend.put(CONFIG_NAME, json.dumps(doc, indent=1).encode())
        return cls(backend, cfg, key, slot, clock)

    @classmethod
    def open(
        cls, backend: Backend, *, passphrase: PassphraseSource | None = None,
        keyfile: bytes | None = None, clock: Clock = utcnow, use_cache: bool = True,
    ) -> Repository:
        doc = _read_config(backend)
        try:
            cfg = RepoConfig(str(doc["id"]), str(doc["encryption"]), int(doc["chunk_size"]),
                             int(doc.get("compression_level", DEFAULT_LEVEL)), str(doc["created"]))
        except (KeyError, ValueError, TypeError):
            raise IntegrityError("the repository config is malformed") from None
        if cfg.encryption == "none":
            if next(iter(backend.list("keys")), None) is not None:
                # the config is MAC'd only when encrypted: "none" next to key slots is a
                # downgrade (later backups would be stored in plaintext), never trusted
                raise IntegrityError("the repository config says it is unencrypted, but it "
                                     "has key slots (tampered?)")
            return cls(backend, cfg, None, None, clock, use_cache)
        if cfg.encryption != "aes-256-gcm":
            raise UnsupportedFormat(f"unknown repository encryption {cfg.encryption!r}")
        key, slot = cls._unlock(backend, cfg, passphrase, keyfile)
        mac = blake3.blake3(_canonical(doc), key=key.mac_key).hexdigest()
        if not secrets.compare_digest(mac, str(doc.get("mac", ""))):
            if keyfile is not None:
                raise WrongPassword("the key file does not open this repository")
            raise IntegrityError("the repository config failed its MAC check (tampered?)")
        return cls(backend, cfg, key, slot, clock, use_cache)

    @staticmethod
    def _unlock(
        backend: Backend, cfg: RepoConfig, passphrase: PassphraseSource | None,
        keyfile: bytes | None,
    ) -> tuple[MasterKey, str | None]:
        if keyfile is not None:
            return parse_keyfile(keyfile, cfg.id)[1], None
        if passphrase is None:
            raise WrongPassword("the repository is encrypted: give a passphrase or key file")
        slots: list[dict[str, Any]] = []
        damaged: list[IntegrityError] = []
        for o in backend.list("keys"):
            try:  # one damaged slot must not lock out the passphrases of the others
                slots.append(parse_slot(backend.get(o.name)))
            except (IntegrityError, UnsupportedFormat) as exc:
                log.warning("skipping damaged key slot %s: %s", o.name, exc.message)
                damaged.append(IntegrityError(f"{o.name}: {exc.message}"))
        if not slots and damaged:
            raise IntegrityError(f"every key slot is damaged ({damaged[0].message}); open "
                                 "the repository with a key file")
        if not slots:
            raise WrongPassword("the repository has no key slots; open it with a key file")
        pw = passphrase()
        for doc in slots:
            try:
                key = open_slot(doc, cfg.id, pw)
            except IntegrityError as exc:
                log.warning("skipping key slot %s: %s", str(doc.get("slot"))[:16], exc.message)
                damaged.append(exc)
                continue
            if key is not None:
                return key, str(doc["slot"])
        if damaged:
            raise IntegrityError(f"no key slot opens with that passphrase, and "
                                 f"{len(damaged)} key slot(s) are damaged: "
                                 f"{damaged[0].message}")
        raise WrongPassword()

    def release_on_close(self, release: Callable[[], None]) -> None:
        """Call *release* (e.g. a lock's) when the repository closes, before its backend."""
        self._on_close.append(release)

    def close(self) -> None:
        while self._on_close:
            self._on_close.pop()()
        if self.cache:
            self.cache.close()
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lock(self, exclusive: bool, command: str = "", wait: float = 0.0) -> Lock:
        return Lock(self.backend, exclusive, command, self.clock).acquire(wait)

    # ----------------------------------------------------------------- metadata copies
    def raw_metadata(self) -> tuple[bytes, dict[str, bytes]]:
        """The config object and every key slot object, verbatim: what a tape carries so
        the repository can be recreated from tape alone (``recreate``)."""
        keys = {o.name: self.backend.get(o.name) for o in self.backend.list("keys")}
        return self.backend.get(CONFIG_NAME), keys

    @staticmethod
    def recreate(backend: Backend, config: bytes, keys: dict[str, bytes]) -> None:
        """Write a config and key slots from ``raw_metadata`` into an empty *backend*
        (the same repository id and keys); a backend that holds a repository is left as
        it is. Open it afterwards: the config's MAC is checked then."""
        backend.create()
        if backend.exists(CONFIG_NAME):
            return
        for name, data in keys.items():
            if not name.startswith("keys/") or "/" in name[5:]:
                raise IntegrityError(f"bad key slot name {name!r}")
            backend.put(name, data)
        backend.put(CONFIG_NAME, config)

    # ----------------------------------------------------------------- keys
    def key_slots(self) -> list[dict[str, Any]]:
        return [parse_slot(self.backend.get(o.name)) for o in self.backend.list("keys")]

    def add_key_slot(self, passphrase: str, label: str, kdf: KdfParams | None = None) -> str:
        if self.key is None:
            raise UsageError("the repository is not encrypted; it has no keys")
        slot, doc = make_slot(self.key, self.id, passphrase, label, kdf or default_kdf(),
                              self.clock())
        self.backend.put(f"keys/{slot}", doc)
        return slot

    def remove_key_slot(self, slot: str) -> None:
        slots = {str(d["slot"]) for d in self.key_slots()}
        if slot not in slots:
            raise UsageError(f"no key slot {slot!r}")
        if slots == {slot}:
            raise UsageError("refusing to remove the last key slot (export a key file first)")
        self.backend.delete(f"keys/{slot}")

    def export_key(self) -> bytes:
        if self.key is None:
            raise UsageError("the repository is not encrypted; it has no key to export")
        return keyfile_bytes(self.key, self.id)

    # ----------------------------------------------------------------- chunks
    def generation(self) -> str:
        try:
            return self.backend.get(GENERATION_NAME).decode("ascii", "replace").strip()
        except ObjectNotFound:
            return "0"

    def generation_changed(self) -> bool:
        return self.generation() != self._generation_at_open

    def bump_generation(self) -> None:
        self.backend.put(GENERATION_NAME, secrets.token_hex(16).encode())

    def list_chunks(self) -> Iterator[ObjectInfo]:
        """Every stored chunk object, one ``data/XX/`` shard listing at a time: a storage
        wrapper materialises each listing (to retry it cleanly), and 256 small lists
        stay small where one list of a million chunks would take 300 MB."""
        for shard in range(256):
            yield from self.backend.list(f"data/{shard:02x}")

    def ensure_chunk_index(self) -> None:
        """Make the cache's chunk list complete (one listing of ``data/``)."""
        if self.cache and not self.cache.chunks_complete:
            self.cache.fill_chunks(bytes.fromhex(os.path.basename(o.name))
                                   for o in self.list_chunks())
        else:
            self._chunk_list_usable()

    def _chunk_list_usable(self) -> bool:
        """Whether the cache's chunk list may answer ``has_chunk``: it is complete, and
        (checked once per open) no snapshot the cache knew has vanished from the
        repository. A vanished one means a forget, or a repository rolled back to an
        older copy of itself (same ID, same prune generation) whose chunks the cache
        still lists: the list is rebuilt from a listing before any backup trusts it."""
        if not (self.cache and self.cache.chunks_complete):
            return False
        if self._chunk_list_checked:
            return True
        with self._chunk_check_lock:
            if not self._chunk_list_checked:
                self._chunk_list_checked = True
                ids = set(self.snapshot_ids())
                if self.cache.snapshot_ids() - ids:
                    log.info("snapshots this cache knew are gone; re-listing the chunks")
                    self.refresh_chunk_index()
                    self.cache.forget_snapshots(ids)
        return True

    def refresh_chunk_index(self) -> None:
        """Rebuild the cache's chunk list from a fresh listing of ``data/`` (e.g. after a
        run that was killed before it could save its cache)."""
        if self.cache:
            self.cache.flush()
            self.cache.fill_chunks(bytes.fromhex(os.path.basename(o.name))
                                   for o in self.list_chunks())

    def stale_temporaries(self, older_than: float) -> list[ObjectInfo]:
        """Temporary objects (``*.tmp``) that killed writers left behind, older than
        *older_than* seconds (format.md §1): younger ones may belong to a running write."""
        now = self.clock().timestamp()
        return [o for prefix in TEMP_PREFIXES for o in self.backend.list_temporary(prefix)
                if now - o.mtime >= older_than]

    def has_chunk(self, oid: bytes) -> bool:
        if oid == HOLE:
            return True
        if self.cache is not None and self._chunk_list_usable():
            return self.cache.has_chunk(oid)
        return self.backend.exists(chunk_name(oid))

    def put_chunk(self, oid: bytes, data: bytes | memoryview) -> int:
        """Store a chunk whose ID is *oid*; return the stored size."""
        blob = self.codec.pack(TYPE_CHUNK, oid, data)
        self.backend.put(chunk_name(oid), blob)
        if self.cache:
            self.cache.add_chunk(oid)
        return len(blob)

    def put_raw_chunk(self, oid: bytes, blob: bytes) -> None:
        """Store an already-encoded chunk (copy between repositories sharing a key)."""
        self.codec.unpack(TYPE_CHUNK, oid, blob, "chunk")
        self.backend.put(chunk_name(oid), blob)
        if self.cache:
            self.cache.add_chunk(oid)

    def get_raw_chunk(self, oid: bytes) -> bytes:
        try:
            return self.backend.get(chunk_name(oid))
        except ObjectNotFound:
            raise ObjectNotFoundInRepo(f"chunk {oid.hex()[:16]} is missing") from None

    def get_chunk(self, oid: bytes) -> bytes:
        return self.codec.unpack(TYPE_CHUNK, oid, self.get_raw_chunk(oid), "chunk")

    def get_chunk_into(self, oid: bytes, out: memoryview) -> None:
        """Decode chunk *oid* into *out* (exactly its length), verified; the restore path."""
        self.codec.unpack_into(TYPE_CHUNK, oid, self.get_raw_chunk(oid), out, "chunk")

    # ----------------------------------------------------------------- snapshots
    def save_snapshot(self, snap: Snapshot) -> str:
        """Write the manifest (the atomic commit point of a backup); return its ID.

        A new snapshot's name must pass :func:`~vmdr.repository.resolve.check_name`; a
        copy of an existing snapshot (``meta["copied_from"]``) keeps its name as it is,
        so an old, badly named snapshot stays reachable by ID."""
        if "copied_from" not in snap.meta:
            from vmdr.repository.resolve import check_name

            check_name(snap.name)
        if not snap.host:
            snap.host = socket.gethostname()
        plain = manifest.encode(snap)
        oid = self.codec.object_id(plain)
        self.backend.put(f"snapshots/{oid.hex()}", self.codec.pack(TYPE_SNAPSHOT, oid, plain))
        snap.id = oid.hex()
        if self.cache:
            self.cache.flush()
            self.cache.put_snapshot(snap.id, plain)
        return snap.id

    def commit_snapshot(self, snap: Snapshot, reused: Iterable[bytes],
                        hint: str = "run the backup again") -> str:
        """Commit a backup: write *snap*'s manifest, having made sure that every chunk it
        *reused* (found already stored instead of uploading it) still exists.

        The prune-generation re-check of format.md §9, in one place so no job can forget
        it. Prune holds the exclusive lock and backups a shared one, so this only matters
        when locks were broken by hand: a prune that deleted chunks changed
        ``state/generation``; if it changed since the repository was opened, the reused
        chunks are checked before the manifest is written, and if it changed again while
        checking and writing, they are checked once more and the manifest is taken back.
        *reused* is iterated again for each re-check (a set, or a re-iterable view).
        Raises :class:`IntegrityError` (naming *hint*) when a reused chunk is gone.
        """
        return self._commit(snap.name, lambda: self.save_snapshot(snap), reused, hint)

    def commit_raw_snapshot(self, sid: str, blob: bytes, name: str, chunks: Iterable[bytes],
                            hint: str = "run it again") -> str:
        """Commit an already-encoded manifest (a copy between repositories sharing a key),
        with the same re-check as :meth:`commit_snapshot` for its *chunks*."""
        def write() -> str:
            self.codec.unpack(TYPE_SNAPSHOT, bytes.fromhex(sid), blob, "snapshot")
            self.backend.put(f"snapshots/{sid}", blob)
            return sid
        return self._commit(name, write, chunks, hint)

    def _commit(self, name: str, write: Callable[[], str], reused: Iterable[bytes],
                hint: str) -> str:
        # *reused* may be a re-iterable view of millions of IDs (copy): it becomes a set
        # only in the rare case that a prune ran meanwhile
        seen = self.generation()
        if seen != self._generation_at_open:
            self._require_chunks(name, set(reused) - {HOLE}, hint)
            if self.cache:  # its chunk list predates the prune
                self.cache.sync_generation(seen)
        sid = write()
        if self.generation() != seen:  # a prune finished between the check and the write
            try:
                self._require_chunks(name, set(reused) - {HOLE}, hint)
            except IntegrityError:
                try:
                    self.backend.delete(f"snapshots/{sid}")
                except VmdrError as exc:  # e.g. append-only: check will name it
                    log.error("could not take back snapshot %s: %s", sid[:16], exc.message)
                if self.cache:
                    self.cache.forget_snapshots(set(self.snapshot_ids()))
                raise
        return sid

    def _require_chunks(self, name: str, ids: set[bytes], hint: str) -> None:
        if len(ids) > 256:  # one listing instead of a request per chunk
            present = {bytes.fromhex(os.path.basename(o.name)) for o in self.list_chunks()}
            missing = len(ids - present)
        else:
            missing = sum(1 for oid in ids if not self.backend.exists(chunk_name(oid)))
        if missing:
            raise IntegrityError(f"{name}: a concurrent prune removed {missing} chunks "
                                 f"this snapshot uses; nothing was committed: {hint}")

    def load_snapshot(self, sid: str, use_cache: bool = True, chunks: bool = True) -> Snapshot:
        """The snapshot *sid*. A cached manifest is used only if it still hashes to its
        ID; ``use_cache=False`` (``check``) always reads the repository. ``chunks=False``
        leaves the chunk lists out (see :func:`manifest.decode`)."""
        plain = self.cache.get_snapshot(sid) if self.cache and use_cache else None
        if plain is not None and self.codec.object_id(plain).hex() != sid:
            log.warning("cached manifest of snapshot %s is damaged; reading the repository",
                        sid[:16])
            plain = None
        if plain is None:
            try:
                blob = self.backend.get(f"snapshots/{sid}")
            except ObjectNotFound:
                raise SnapshotNotFound(f"no snapshot {sid[:16]}") from None
            plain = self.codec.unpack(TYPE_SNAPSHOT, bytes.fromhex(sid), blob, "snapshot")
            snap = manifest.decode(plain, sid, chunks)
            if self.cache and use_cache:  # check (no cache) reads each manifest once
                self.cache.put_snapshot(sid, plain)
            return snap
        return manifest.decode(plain, sid, chunks)

    def snapshot_ids(self) -> list[str]:
        out = []
        for o in self.backend.list("snapshots"):
            sid = o.name.rsplit("/", 1)[-1]
            if len(sid) == 64 and all(c in "0123456789abcdef" for c in sid):
                out.append(sid)
        return out

    def list_snapshots(self, name: str | None = None, chunks: bool = True) -> list[Snapshot]:
        """Every readable snapshot (of *name*), oldest first. A manifest that cannot be
        read or decoded is skipped with a warning naming its ID, and remembered in
        :attr:`damaged`; one bad file never hides the others. ``chunks=False`` leaves the
        chunk lists out (32 bytes a chunk reference): for listings that only need the
        headers, memory stays flat however large the snapshots are."""
        ids = self.snapshot_ids()
        snaps = []
        for sid in ids:
            try:
                snaps.append(self.load_snapshot(sid, chunks=chunks))
            except (IntegrityError, UnsupportedFormat, SnapshotNotFound) as exc:
                if isinstance(exc, SnapshotNotFound):
                    continue  # deleted since the listing
                if sid not in self.damaged:
                    log.warning("snapshot %s is damaged and was skipped: %s (run 'vmdr "
                                "check')", sid, exc.message)
                self.damaged[sid] = exc.message
        if self.cache:
            self.cache.forget_snapshots(set(ids))
        if name is not None:
            snaps = [s for s in snaps if s.name == name]
        return sorted(snaps, key=lambda s: (s.time, s.id))

    def resolve(self, ref: str) -> Snapshot:
        """Resolve a snapshot reference (rules in :mod:`vmdr.repository.resolve`)."""
        from vmdr.repository.resolve import resolve_ref

        snaps = self.list_snapshots(chunks=False)  # the headers decide; then load one
        snap = self.load_snapshot(resolve_ref(ref, snaps, dict(self.damaged)).id)
        if self.damaged and (ref == snap.name or ref.endswith("@latest")):
            log.warning("%s resolved to %s@%s, the newest readable one; %d damaged "
                        "snapshot(s) could not be read and may be newer ones of %s",
                        ref, snap.name, snap.short_id, len(self.damaged), snap.name)
        return snap

    def delete_snapshot(self, sid: str) -> None:
        for a in list(self.backend.list(f"attachments/{sid}")):
            self.backend.delete(a.name)
        try:
            self.backend.delete(f"snapshots/{sid}")
        except ObjectNotFound:
            pass

    # ----------------------------------------------------------------- attachments
    def add_attachment(self, sid: str, doc: dict[str, Any]) -> str:
        doc = {"snapshot": sid, "time": format_time(self.clock()), **doc}
        plain = json.dumps(doc, sort_keys=True).encode()
        oid = self.codec.object_id(plain)
        self.backend.put(f"attachments/{sid}/{oid.hex()}",
                         self.codec.pack(TYPE_ATTACHMENT, oid, plain))
        return oid.hex()

    def attachments(self, sid: str, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for o in self.backend.list(f"attachments/{sid}"):
            oid = bytes.fromhex(o.name.rsplit("/", 1)[-1])
            doc = json.loads(self.codec.unpack(TYPE_ATTACHMENT, oid, self.backend.get(o.name),
                                               "attachment"))
            if doc.get("snapshot") != sid:
                raise IntegrityError(f"attachment {o.name} belongs to another snapshot")
            if kind is None or doc.get("kind") == kind:
                out.append(doc)
        return sorted(out, key=lambda d: parse_time(d["time"]))

    def attachment_ids(self, sid: str) -> list[str]:
        """The object IDs of *sid*'s attachments (no reading, no decrypting)."""
        return [o.name.rsplit("/", 1)[-1] for o in self.backend.list(f"attachments/{sid}")]

    def snapshots_with_attachments(self) -> set[str]:
        """IDs of the snapshots that have any attachment (one listing)."""
        return {o.name.split("/")[1] for o in self.backend.list("attachments")
                if o.name.count("/") >= 2}

    def get_raw_snapshot(self, sid: str) -> bytes:
        """The stored (encoded) manifest of *sid*, for a copy to a repository that shares
        the key."""
        try:
            return self.backend.get(f"snapshots/{sid}")
        except ObjectNotFound:
            raise SnapshotNotFound(f"no snapshot {sid[:16]}") from None

    def get_raw_attachment(self, sid: str, aid: str) -> bytes:
        return self.backend.get(f"attachments/{sid}/{aid}")

    def put_raw_attachment(self, sid: str, aid: str, blob: bytes) -> None:
        """Store an already-encoded attachment (checked with this repository's key)."""
        self.codec.unpack(TYPE_ATTACHMENT, bytes.fromhex(aid), blob, "attachment")
        self.backend.put(f"attachments/{sid}/{aid}", blob)

    def is_protected(self, sid: str) -> bool:
        recs = self.attachments(sid, "protect")
        return bool(recs and recs[-1].get("protected"))

    def set_protected(self, sid: str, protected: bool) -> None:
        self.add_attachment(sid, {"kind": "protect", "protected": protected})

    def referenced_chunks(self, snaps: Iterable[Snapshot]) -> set[bytes]:
        out: set[bytes] = set()
        for s in snaps:
            for d in s.disks:
                out |= d.chunks.ids()
        return out
