"""The one HTML template toolkit: Jinja2 with autoescaping, for the DR plan and the coming
dashboard.

Each package keeps its templates in its own ``templates/`` directory (the plan's in
``vmdr/plan/templates``); shared layouts live in ``vmdr/templates`` (``base.html``: the
page skeleton with inline CSS, no external assets). :func:`environment` gives one package
an environment that finds its own templates first, then the shared ones.

Every ``{{ value }}`` is HTML-escaped; only :class:`markupsafe.Markup` passes through, so
markup is built in templates, never by string formatting in Python. Undefined names are
errors (``StrictUndefined``), not empty strings. Shared filters:

* ``inline``: the inline Markdown subset (```code```, ``**bold**``) on escaped text;
* ``num``: a number with at most one decimal (SVG coordinates).

A package adds its own filters to its environment (the plan adds ``duration``).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from jinja2 import ChoiceLoader, Environment, PackageLoader, StrictUndefined, Undefined
from markupsafe import Markup, escape

__all__ = ["Markup", "environment", "inline_markdown", "render"]

_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>")]


def inline_markdown(text: object) -> Markup:
    """Escape *text*, then turn ```code``` and ``**bold**`` into tags (safe: the tags are
    added after escaping, around already-escaped text)."""
    out = str(escape(str(text)))
    for rx, rep in _INLINE:
        out = rx.sub(rep, out)
    return Markup(out)  # noqa: S704 - built from escaped text above


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


@functools.cache
def environment(package: str, strict: bool = True) -> Environment:
    """The environment for *package* (e.g. ``"vmdr.plan"``): its ``templates/`` first,
    then the shared ``vmdr/templates``; autoescaping on for every template.

    ``strict=False`` renders an undefined name as nothing instead of failing: only for
    pages over data whose keys are optional by nature (the dashboard's job events and
    status records), where a missing key must not turn a page into an error."""
    env = Environment(
        loader=ChoiceLoader([PackageLoader(package, "templates"),
                             PackageLoader("vmdr", "templates")]),
        autoescape=True, undefined=StrictUndefined if strict else Undefined,
        trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["inline"] = inline_markdown
    env.filters["num"] = _num
    return env


def render(package: str, template: str, **context: Any) -> str:
    return environment(package).get_template(template).render(**context)
