"""The plan's cache file: the last fresh reading of every host and repository, with its
time, kept for the day they cannot be reached.

A JSON file (``[plan] cache_file``, by default ``plan-facts.json`` in the cache
directory, as the plan job resolves it). It is advisory: a missing or unreadable file is
an empty cache, and a failed write is ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from typing import Any

from vmdr.plan import history
from vmdr.plan.discovery import DiscoveredVM, HostState
from vmdr.timeutil import format_time, parse_time

CACHE_VERSION = 1


def empty() -> dict[str, Any]:
    return {"version": CACHE_VERSION, "hosts": {}, "repositories": {}}


def load(path: str) -> dict[str, Any]:
    """The cached facts, or an empty cache when missing or unreadable (it is advisory)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if isinstance(doc, dict) and doc.get("version") == CACHE_VERSION:
            return doc
    except (OSError, ValueError):
        pass
    return empty()


def save(path: str, hosts: dict[str, HostState], repos: dict[str, history.RepoState],
         old: dict[str, Any]) -> None:
    """Write fresh readings over the old ones (atomically; failures are ignored)."""
    host_docs: dict[str, Any] = dict(old.get("hosts", {}))
    repo_docs: dict[str, Any] = dict(old.get("repositories", {}))
    doc = {"version": CACHE_VERSION, "hosts": host_docs, "repositories": repo_docs}
    for h in hosts.values():
        if h.reachable and h.read_at:
            host_docs[h.name] = {"read_at": format_time(h.read_at),
                                 "vms": [_vm_doc(v) for v in h.vms]}
    for r in repos.values():
        if r.reachable:
            repo_docs[r.name] = history.to_cache(r)
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def _vm_doc(v: DiscoveredVM) -> dict[str, Any]:
    return {"name": v.name, "vcpus": v.vcpus, "memory": v.memory, "state": v.state,
            "disks": [list(d) for d in v.disks]}


def host(name: str, doc: dict[str, Any]) -> tuple[datetime | None, list[DiscoveredVM]]:
    """A host's cached reading: its time and VMs (None, [] when unusable)."""
    try:
        vms = [DiscoveredVM(v["name"], name, int(v["vcpus"]), int(v["memory"]),
                            str(v["state"]), tuple((str(a), int(b)) for a, b in v["disks"]))
               for v in doc["vms"]]
        return parse_time(doc["read_at"]), vms
    except (KeyError, TypeError, ValueError):
        return None, []


def repository(doc: dict[str, Any]) -> tuple[datetime | None, list[history.Copy]]:
    """A repository's cached reading: its time and copies (None, [] when unusable)."""
    return history.from_cache(doc)
