"""The template toolkit escapes everything it is given; the plan page is built with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from jinja2 import UndefinedError

from vmdr import templating
from vmdr.plan import render_html, runbook

from .test_plan_estates import build_estate, evaluate

EVIL = '<script>alert("x")</script> & `<img src=x onerror=1>` **<b>**'


def test_inline_markdown_escapes_before_it_formats() -> None:
    out = templating.inline_markdown(EVIL)
    assert "<script>" not in out and "<img" not in out
    assert "&lt;script&gt;" in out and "<code>&lt;img src=x onerror=1&gt;</code>" in out
    assert "<b>&lt;b&gt;</b>" in out


def test_undefined_names_are_errors() -> None:
    env = templating.environment("vmdr.plan")
    with pytest.raises(UndefinedError):
        env.from_string("{{ nothing }}").render()


def test_the_plan_page_escapes_what_the_inventory_says(tmp_path: Path) -> None:
    plan = runbook.build(evaluate(build_estate("single-host", tmp_path)))
    settings = dataclasses.replace(plan.inv.settings, title=EVIL, organisation=EVIL)
    object.__setattr__(plan.inv, "settings", settings)
    page = render_html.render(plan)
    assert "<script>" not in page and "<img" not in page
    assert page.count("&lt;script&gt;") >= 3  # <title>, <h1>, the organisation line
    assert page.startswith("<!DOCTYPE html>") and page.count("</body>") == 1
