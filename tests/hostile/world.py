"""The hostile battery's world: small real repositories with known snapshots, credential
files of every wrong kind, and a per-case staging area.

The templates are built once per session through the repository API (so snapshot times
can lie in the past, which retention cases need); every case then gets its own copy,
hard-linked (vmdr never modifies an object in place: it writes a temporary name and
renames), so a case that wrongly deletes or writes something harms only itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vmdr.jobs import diskcopy
from vmdr.repository import manifest
from vmdr.repository.keys import KdfParams
from vmdr.repository.manifest import DiskRecord, Snapshot
from vmdr.repository.repo import Repository
from vmdr.storage.file import FileBackend

PASS = "correct horse battery staple"
CHUNK = 64 << 10
IMAGE_SIZE = 256 << 10  # four chunks
REPOS = ("repo", "repo2", "plain", "empty", "big")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
WEB_XML = """<domain type='kvm'><name>web</name>
<uuid>6f0c8a52-3b7e-4c43-9d55-1b2f4f6c0a11</uuid><memory unit='KiB'>65536</memory>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/var/lib/libvirt/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
<interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/>
</interface></devices></domain>"""


class _Clock:
    def __init__(self, t: datetime) -> None:
        self.now = t

    def __call__(self) -> datetime:
        return self.now


def image_bytes(seed: int, size: int = IMAGE_SIZE) -> bytes:
    """Random chunks, a zero chunk (a hole) and a text chunk shared by every seed."""
    rng = random.Random(seed)
    buf = bytearray(rng.randbytes(size))
    buf[CHUNK : 2 * CHUNK] = bytes(CHUNK)
    buf[3 * CHUNK : 4 * CHUNK] = (b"shared text chunk " * CHUNK)[:CHUNK]
    return bytes(buf)


def _ingest(repo: Repository, name: str, data: bytes) -> DiskRecord:
    rec, _ = diskcopy.ingest(repo, name, len(data), "raw", [(0, len(data))],
                             lambda off, n: data[off : off + n], workers=1)
    return rec


def _save(repo: Repository, clock: _Clock, name: str, disks: list[DiskRecord], t: datetime,
          tags: list[str] | None = None, meta: dict[str, object] | None = None) -> Snapshot:
    clock.now = t
    snap = Snapshot(name=name, time=t, chunk_size=repo.chunk_size, disks=disks,
                    tags=tags or [], meta={"kind": "image", **(meta or {})}, host="hostile")
    repo.save_snapshot(snap)
    return snap


def _twin(repo: Repository, clock: _Clock, name: str, disks: list[DiskRecord],
          t: datetime, prefix: str) -> Snapshot:
    """A snapshot of *name* whose ID starts with the 4 hex digits *prefix* (found by
    varying a meta field; ~65k manifest hashes)."""
    for salt in range(2_000_000):
        snap = Snapshot(name=name, time=t, chunk_size=repo.chunk_size, disks=disks,
                        meta={"kind": "image", "salt": salt}, host="hostile")
        if repo.codec.object_id(manifest.encode(snap)).hex().startswith(prefix):
            clock.now = t
            repo.save_snapshot(snap)
            return snap
    raise AssertionError("no twin found")


def _new_repo(path: Path, clock: _Clock, encryption: str = "aes-256-gcm",
              chunk: int = CHUNK) -> Repository:
    return Repository.init(FileBackend(str(path)), passphrase=PASS, encryption=encryption,
                           chunk_size=chunk, kdf=KdfParams.for_tests(), clock=clock)


def _private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


@dataclass
class World:
    """The templates, and the values cases refer to as ``{placeholders}``."""

    root: Path
    values: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str, case_dir: Path) -> str:
        vals = {**self.values, "w": str(self.root), "tmp": str(case_dir)}
        for r in REPOS:
            vals[r] = str(case_dir / r)
        out = text
        for k in sorted(vals, key=len, reverse=True):
            out = out.replace("{" + k + "}", vals[k])
        return out

    def stage(self, case_dir: Path) -> None:
        """Hard-linked copies of every template repository under *case_dir*."""
        for r in REPOS:
            shutil.copytree(self.root / "templates" / r, case_dir / r, copy_function=os.link)

    def env(self, case_dir: Path, preset: str) -> dict[str, str]:
        env = {"VMDR_CACHE_DIR": str(case_dir / "cache"),
               "VMDR_LOCK_DIR": str(case_dir / "vmlocks")}
        if preset == "repo":
            env.update(VMDR_REPO=str(case_dir / "repo"),
                       VMDR_PASSWORD_FILE=str(self.root / "pw"))
        elif preset != "bare":
            raise ValueError(f"unknown preset {preset!r}")
        return env


def fingerprint(path: Path) -> dict[str, tuple[int, str]]:
    """Every file under *path*: relative name → (size, sha256 of its first 64 KiB)."""
    out: dict[str, tuple[int, str]] = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        if p.is_file() or p.is_symlink():
            st = p.lstat()
            head = p.read_bytes()[:65536] if stat.S_ISREG(st.st_mode) else b""
            out[str(p.relative_to(path))] = (st.st_size, hashlib.sha256(head).hexdigest())
    return out


def build_world(root: Path) -> World:
    """Build every template once (about a second with the test KDF)."""
    w = World(root)
    t = root / "templates"
    t.mkdir(parents=True)
    clock = _Clock(T0)
    v = w.values

    # ---- the main repository: vm1 ×3 (+ a twin), othervm (+ a cross-name twin), multi
    with _new_repo(t / "repo", clock) as repo:
        d1, d2, d3 = (_ingest(repo, "disk.raw", image_bytes(s)) for s in (1, 2, 3))
        a1 = _save(repo, clock, "vm1", [d1], T0, ["daily"])
        a2 = _save(repo, clock, "vm1", [d2], T0 + timedelta(days=1), ["daily"])
        a3 = _save(repo, clock, "vm1", [d3], T0 + timedelta(days=2), ["weekly"])
        repo.set_protected(a3.id, True)
        twin = _twin(repo, clock, "vm1", [d1], T0 + timedelta(days=3), a1.id[:4])
        o1 = _save(repo, clock, "othervm", [_ingest(repo, "disk.raw", image_bytes(11))],
                   T0 + timedelta(days=1))
        xtwin = _twin(repo, clock, "othervm", [o1.disks[0]], T0 + timedelta(days=4),
                      a2.id[:4])
        m1 = _save(repo, clock, "multi", [_ingest(repo, "vda", image_bytes(21)),
                                          _ingest(repo, "vdb", image_bytes(22))],
                   T0 + timedelta(days=1))
        web = _save(repo, clock, "web", [_ingest(repo, "vda", image_bytes(41))],
                    T0 + timedelta(days=1), meta={"kind": "vm", "config": {
                        "domain_xml": WEB_XML}})
        key = repo.export_key()
        v["slot"] = str(repo.slot)
        v["slot_4"] = str(repo.slot)[:4]
    for label, s in (("web", web), ("a1", a1), ("a2", a2), ("a3", a3), ("twin", twin), ("o1", o1),
                     ("xtwin", xtwin), ("m1", m1)):
        v[label] = s.id
        v[f"{label}_8"] = s.id[:8]
        v[f"{label}_4"] = s.id[:4]
        v[f"{label}_3"] = s.id[:3]
    v["ambig_in_vm1"] = a1.id[:4]      # vm1@ambig_in_vm1: two vm1 snapshots
    v["ambig_across"] = a2.id[:4]      # bare: a vm1 and an othervm snapshot

    with _new_repo(t / "repo2", clock) as r2:
        key2 = r2.export_key()
    with _new_repo(t / "plain", clock, encryption="none") as rp:
        _save(rp, clock, "vm1", [_ingest(rp, "disk.raw", image_bytes(1))], T0)
    with _new_repo(t / "empty", clock):
        pass
    with _new_repo(t / "big", clock, chunk=4 << 20):
        pass

    # ---- credential files of every kind
    _private(root / "pw", PASS + "\n")
    _private(root / "pw_world", PASS + "\n", 0o644)
    _private(root / "pw_group", PASS + "\n", 0o640)
    _private(root / "pw_wrong", "not the passphrase\n")
    _private(root / "pw_empty", "")
    _private(root / "pw_newline", "\n")
    _private(root / "pw_binary", b"\xff\xfe\xfa\x00\n")
    _private(root / "pw_new", "a brand new passphrase\n")
    (root / "pw_dir").mkdir(mode=0o700)
    _private(root / "keyfile", key)
    _private(root / "keyfile_world", key, 0o644)
    _private(root / "keyfile_other", key2)
    _private(root / "keyfile_garbage", b"this is not a key file\n")
    _private(root / "keyfile_binary", os.urandom(200))
    _private(root / "keyfile_json", b'{"format": "vmdr-keyfile", "version": 1}\n')
    _private(root / "keyfile_v9", b'{"format": "vmdr-keyfile", "version": 9}\n')
    _private(root / "keyfile_shortkey",
             b'{"format": "vmdr-keyfile", "version": 1, "repository": "00", '
             b'"master_key": "AAAA"}\n')
    # ---- odd paths
    (root / "img.raw").write_bytes(image_bytes(31))
    (root / "regular_file").write_text("I am not a repository\n")
    (root / "emptydir").mkdir()
    (root / "web-vda.img").write_text("an existing restore target\n")
    (root / "notrepo").mkdir()
    (root / "notrepo" / "vmdr-repo").write_text("{ not json")
    os.mkfifo(root / "fifo")
    (root / "script_noexec").write_text("#!/bin/sh\nexit 0\n")
    return w
