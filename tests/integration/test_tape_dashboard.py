"""The dashboard's tape page in headless chromium, against a real agent whose database
holds the tape catalog: a pool with a vault, two labelled tapes, a tape backup of an image
to the virtual library, one tape exported to the vault. The page shows the pool, each tape
where it is (vault, or the changer's slot), the media set with its snapshot, the activity
and the checklist; the printable checklist matches ``vmdr tape vault``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.repofixtures import make_image

from .agent_services import running_agent
from .test_agent_live import _browser, free_port
from .vmtools import repo_env, vmdr

pytestmark = pytest.mark.chromium


@pytest.fixture
def tape_agent(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = repo_env(tmp_path)
    port = free_port()
    cfg = tmp_path / "vmdr.toml"
    cfg.write_text(f'[agent]\nlisten = "127.0.0.1:{port}"\nstate = "{tmp_path}/agent.db"\n')
    env.update(VMDR_CONFIG=str(cfg), VMDR_TAPE_LIBRARY=f"virtual:{tmp_path / 'vtl'}")
    env.pop("VMDR_TAPE_DIR", None)
    vmdr(env, "tape", "virtual-create", str(tmp_path / "vtl"), "--tapes", "2",
         "--capacity", "256M")
    with running_agent(env, port, tmp_path / "agent.log", tries=150) as url:
        yield url, env


def test_tape_page(tape_agent: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    url, env = tape_agent
    make_image(str(tmp_path / "disk.img"), 4 << 20, seed=3, pieces=20)
    vmdr(env, "image", "backup", str(tmp_path / "disk.img"), "--name", "web")
    # the agent's database exists, so the tape commands keep the catalog there
    vmdr(env, "tape", "pool", "add", "weekly", "--vault", "bunker", "--retention", "8w")
    vmdr(env, "tape", "label", "--pool", "weekly", "--slot", "1", "--slot", "2")
    vmdr(env, "tape", "backup", "--pool", "weekly", "web")
    vmdr(env, "tape", "export", "VMD001L8", "--vault", "bunker")
    from vmdr.tape.catalog_db import DbCatalogStore

    in_db = DbCatalogStore(f"sqlite:///{tmp_path / 'agent.db'}").load()
    assert {m.label for m in in_db.media.values()} == {"VMD001L8", "VMD002L8"}
    checklist = vmdr(env, "tape", "vault").stdout
    token = vmdr(env, "agent", "token", "create", "--role", "auditor").stdout.splitlines()[-1]
    shots = Path(os.environ.get("VMDR_AGENT_SHOTS", str(tmp_path / "shots")))
    shots.mkdir(parents=True, exist_ok=True)
    b = _browser()
    try:
        b.get(url + "/login")
        b.find_element(By.ID, "token").send_keys(token)
        b.find_element(By.ID, "login").click()
        WebDriverWait(b, 60).until(lambda d: "Overview" in d.page_source)
        b.find_element(By.LINK_TEXT, "Tape").click()
        WebDriverWait(b, 60).until(lambda d: d.find_elements(By.ID, "tape-media"))
        b.save_screenshot(str(shots / "tape.png"))
        pools = b.find_element(By.ID, "tape-pools").text
        assert "weekly" in pools and "bunker" in pools and "8w" in pools
        rows = {r.text.split()[0]: r.text for r in
                b.find_elements(By.CSS_SELECTOR, "#tape-media tr")[1:]}
        assert "vault bunker" in rows["VMD001L8"], rows
        assert "slot 2" in rows["VMD002L8"] and "labelled" in rows["VMD002L8"], rows
        sets = b.find_element(By.ID, "tape-sets").text
        assert "VMD001L8" in sets and "web@" in sets and "vault bunker" in sets
        activity = b.find_element(By.ID, "tape-activity").text
        assert "VMD001L8 → vault bunker" in activity and "web@" in activity
        b.find_element(By.LINK_TEXT, "Printable checklist").click()
        WebDriverWait(b, 60).until(lambda d: "Carried by" in d.page_source)
        text = b.find_element(By.TAG_NAME, "body").text
    finally:
        b.quit()
    # the same checklist as the command (bar the minute it was printed in)
    assert text.splitlines()[2:] == checklist.rstrip("\n").splitlines()[2:]
