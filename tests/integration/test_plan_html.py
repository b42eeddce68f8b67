"""The HTML plan renders in headless Chromium with the coverage heatmap visible.

Needs the Debian ``chromium`` package (CI installs it; this test installs nothing) and
Pillow (a dependency of WeasyPrint) to read the screenshot.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.unit.test_plan_estates import build_estate, evaluate
from vmdr.plan import render_html, runbook

WIDTH, HEIGHT = 1400, 1000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_heatmap_renders_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    browser = _chromium()
    image = pytest.importorskip("PIL.Image", reason="Pillow is needed to read the screenshot")
    monkeypatch.setenv("VMDR_CACHE_DIR", str(tmp_path / "cache"))
    plan = runbook.build(evaluate(build_estate("two-sites-one-city", tmp_path)))
    page = tmp_path / "plan.html"
    page.write_text(render_html.render(plan), encoding="utf-8")
    shot = tmp_path / "out.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={shot}",
             f"--window-size={WIDTH},{HEIGHT}", page.as_uri()],
            capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 20_000, "no screenshot"
    with image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (WIDTH, HEIGHT)
        region = rgb.crop((0, 150, WIDTH, 650))  # cards and heatmap sit at the top
        colours = region.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 40, f"only {len(colours)} colours: the page looks blank"
    counts = {c: n for n, c in colours}
    # every state present in this estate shows as solid cells of its colour
    for state in ("OK", "ok", "!!", "XX", "--"):
        rgb_state = _hex(render_html.COLOURS[state])
        assert counts.get(rgb_state, 0) > 400, f"heatmap colour of {state} is not visible"
