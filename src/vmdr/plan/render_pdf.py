"""The plan as PDF: the HTML rendering laid out by WeasyPrint.

WeasyPrint (PyPI) needs Pango from the system: on Debian ``libpango-1.0-0`` and
``libpangoft2-1.0-0``.
"""

from __future__ import annotations

from vmdr.errors import VmdrError
from vmdr.plan import render_html
from vmdr.plan.runbook import Plan

PAGE_CSS = "@page{size:A4 landscape;margin:14mm}body{max-width:none;margin:0}"


def render(plan: Plan) -> bytes:
    try:
        import weasyprint  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except (ImportError, OSError) as exc:
        raise VmdrError(f"PDF output needs WeasyPrint and Pango ({exc}): pip install "
                        "weasyprint; apt-get install libpango-1.0-0 libpangoft2-1.0-0") from None
    page = render_html.render(plan).replace("</style>", PAGE_CSS + "</style>", 1)
    pdf = weasyprint.HTML(string=page).write_pdf()
    if not isinstance(pdf, bytes):
        raise VmdrError("WeasyPrint returned no PDF")
    return pdf
