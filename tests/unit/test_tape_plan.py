"""``vmdr tape vault`` and the DR plan agree: a media set counts as a copy in a tape
repository declared with ``vault = X`` exactly when the tape catalog's history puts every
tape of the set in vault X; the 3-2-1-1-0 rule then sees an offsite, immutable copy on a
second kind of media."""

from __future__ import annotations

from pathlib import Path

from tests.unit.repofixtures import FakeClock
from tests.unit.test_tape_jobs import _setup, repo_with_images  # noqa: F401
from vmdr import config
from vmdr.jobs.tape import backup_to_tape
from vmdr.jobs.tape_media import export_tapes, import_tapes, vault_report
from vmdr.jobs.tape_plan import catalog_of, tape_copies
from vmdr.plan import coverage, inventory
from vmdr.plan.history import Copy
from vmdr.repository.repo import Repository

ESTATE = """
[locations.hq]
kind = "building"
name = "HQ"
[locations.bunker-site]
kind = "building"
name = "Bunker"
[hosts.hv1]
location = "hq"
vcpus = 8
memory = "32GiB"
[repositories.local]
url = "/srv/vmdr"
location = "hq"
[repositories.tapes]
url = "tape:{catalog}?pool=daily"
vault = "bunker"
[vaults.bunker]
location = "bunker-site"
retrieval_time = "4h"
[vm.web]
host = "hv1"
"""


def test_vault_and_plan_agree(tmp_path: Path,
                              repo_with_images: tuple[Repository, dict[str, bytes]]  # noqa: F811
                              ) -> None:
    repo, _ = repo_with_images
    clock = FakeClock()
    _vl, lib, store = _setup(tmp_path, clock=clock)
    res = backup_to_tape(repo, lib, store, "daily", [repo.resolve("web")], clock=clock)
    url = f"tape:{store.root}?pool=daily"
    cat, pool = catalog_of(url)
    assert pool == "daily"
    # in the library: a copy on site, none in the vault
    assert tape_copies(cat, "tapes", "bunker", pool) == []
    assert [c.vm for c in tape_copies(cat, "onsite", None, pool)] == ["web"]
    export_tapes(lib, store, "bunker", media_set=res.media_set, clock=clock)
    cat, _ = catalog_of(url)
    in_vault = {v.label for v in vault_report(cat, clock()) if v.location == "vault:bunker"}
    copies = tape_copies(cat, "tapes", "bunker", pool)
    assert in_vault == set(res.tapes) and [c.snapshot for c in copies] == res.snapshots
    # the plan's 3-2-1-1-0: offsite (another building), immutable (vaulted), 2 media
    p = tmp_path / "estate.toml"
    p.write_text(ESTATE.format(catalog=store.root))
    inv = inventory.from_config(config.load(str(p)))
    local = Copy("local", "web", "x" * 64, copies[0].time, copies[0].size)
    rule = coverage._rule(inv, inv.vms["web"], "hv1", [local, *copies])
    assert rule.offsite and rule.immutable and rule.media == 2 and rule.copies == 3
    assert not coverage._rule(inv, inv.vms["web"], "hv1", [local]).offsite
    # recalled: no longer counted in the vault
    import_tapes(lib, store, list(res.tapes), clock=clock)
    cat, _ = catalog_of(url)
    assert tape_copies(cat, "tapes", "bunker", pool) == []
