"""Ways to damage one stored object in place, and where each kind of object lives."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .world import REPOS, World


def truncate(p: Path, other: Path | None = None) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def empty(p: Path, other: Path | None = None) -> None:
    p.write_bytes(b"")


def flip(p: Path, other: Path | None = None) -> None:
    """Flip one bit in the middle (inside the ciphertext, past any header)."""
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def flip_last(p: Path, other: Path | None = None) -> None:
    """Flip one bit of the last byte (the GCM tag, or the end of a JSON document)."""
    data = bytearray(p.read_bytes())
    data[-2] ^= 0x01
    p.write_bytes(bytes(data))


def delete(p: Path, other: Path | None = None) -> None:
    p.unlink()


def replace(p: Path, other: Path | None = None) -> None:
    """Put another object's bytes under this name."""
    assert other is not None
    shutil.copyfile(other, p)


Damage = Callable[[Path, "Path | None"], None]
DAMAGES: dict[str, Damage] = {"truncate": truncate, "empty": empty, "flip": flip,
                              "flip-tag": flip_last, "delete": delete, "replace": replace}


def copy_world_repo(world: World, dest: Path, name: str = "repo") -> Path:
    """A real (not hard-linked) copy of a template repository: safe to damage in place."""
    assert name in REPOS
    shutil.copytree(world.root / "templates" / name, dest)
    return dest


def chunk_path(repo: Path, oid_hex: str) -> Path:
    return repo / "data" / oid_hex[:2] / oid_hex


def chunk_ids_of(repo_env: dict[str, str], ref: str) -> list[str]:
    """The non-hole chunk IDs of snapshot *ref*, read through the repository API."""
    from vmdr.repository.crypto import HOLE
    from vmdr.repository.repo import Repository
    from vmdr.storage.file import FileBackend

    pw = Path(repo_env["VMDR_PASSWORD_FILE"]).read_text().strip()
    with Repository.open(FileBackend(repo_env["VMDR_REPO"]), passphrase=lambda: pw,
                         use_cache=False) as r:
        snap = r.resolve(ref)
        return [oid.hex() for d in snap.disks for oid in d.chunks if oid != HOLE]


def age_files(root: Path, seconds: float) -> None:
    """Make every file under *root* look *seconds* older (prune's safety window)."""
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))
