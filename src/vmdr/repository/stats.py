"""``vmdr repo stats``: logical vs stored bytes, dedup and compression ratios."""

from __future__ import annotations

from typing import Any

from vmdr.repository.crypto import HOLE
from vmdr.repository.repo import Repository


def stats(repo: Repository) -> dict[str, Any]:
    snaps = repo.list_snapshots()
    logical = 0  # sum of virtual disk sizes over all snapshots
    data_logical = 0  # non-hole bytes over all snapshots, before dedup
    unique: dict[bytes, int] = {}
    for s in snaps:
        for d in s.disks:
            logical += d.size
            for i, oid in enumerate(d.chunks):
                if oid == HOLE:
                    continue
                n = min(s.chunk_size, d.size - i * s.chunk_size)
                data_logical += n
                unique[oid] = n
    unique_bytes = sum(unique.values())
    stored = 0
    stored_chunks = 0
    for o in repo.list_chunks():
        stored += o.size
        stored_chunks += 1
    return {
        "repository": repo.id, "location": repo.backend.display_url,
        "encryption": repo.config.encryption, "chunk_size": repo.chunk_size,
        "snapshots": len(snaps), "logical_bytes": logical, "data_bytes": data_logical,
        "unique_bytes": unique_bytes, "stored_bytes": stored, "stored_chunks": stored_chunks,
        "dedup_ratio": round(data_logical / unique_bytes, 3) if unique_bytes else 1.0,
        "compression_ratio": round(unique_bytes / stored, 3) if stored else 1.0,
        "total_ratio": round(data_logical / stored, 3) if stored else 1.0,
    }
