"""One evaluation of the estate: inventory + discovery (or its cache) + repositories → coverage.

The caller supplies how to reach hosts (*connector*, None = offline) and repositories
(*opener*), and ``now``; nothing here reads the clock or prompts.
"""

from __future__ import annotations

from datetime import datetime

from vmdr.config import Config
from vmdr.errors import UsageError
from vmdr.plan import coverage, discovery, history, inventory
from vmdr.plan.coverage import Coverage


def evaluate(cfg: Config, *, opener: history.Opener, connector: discovery.Connector | None,
             now: datetime, timeout: float = 20.0, use_cache: bool = True) -> Coverage:
    inv = inventory.from_config(cfg)
    if not inv.vms and not inv.hosts:
        raise UsageError(f"{inv.path}: the inventory is empty: declare [hosts.NAME], "
                         "[repositories.NAME] and [vm.NAME] (see examples/estate.toml)")
    path = discovery.cache_path(inv)
    cached = discovery.load_cache(path) if use_cache else {}
    hosts = discovery.discover(inv, connector, now, timeout, cached)
    facts = discovery.apply(inv, hosts)
    inventory.check_placed(inv)
    repos = history.load(inv, opener, now, timeout, cached.get("repositories"))
    if use_cache:
        discovery.save_cache(path, hosts, repos, cached)
    return coverage.compute(inv, facts, hosts, repos, now)
