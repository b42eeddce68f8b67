"""The plan as one self-contained HTML page: inline CSS and SVG, no external assets.

At the top, what people look at: a coverage heatmap (VMs × disaster levels), RPO and RTO
against targets, and copies by location. Below, the full written plan (the Markdown
rendering of :mod:`render_md`, parsed here into blocks; it uses a small, known subset).

This module computes data (geometry, states, labels); the markup is in Jinja2 templates
under ``vmdr/plan/templates`` (autoescaped, :mod:`vmdr.templating`).
"""

from __future__ import annotations

import re
from typing import Any

from vmdr import templating
from vmdr.plan import render_md, report, taxonomy
from vmdr.plan.coverage import LevelCoverage
from vmdr.plan.runbook import Plan
from vmdr.plan.units import fmt_duration
from vmdr.timeutil import format_time

COLOURS = {"OK": "#1a9850", "ok": "#a6d96a", "!!": "#fdae61", "XX": "#d73027",
           "--": "#e0e0e0", "stale": "#fee08b", "??": "#9e9ac8", "HA": "#1a9850"}
LEGEND = [("OK", "covered (required)"), ("ok", "covered (not required)"),
          ("!!", "covered, target missed"), ("stale", "covered by a stale reading"),
          ("XX", "required, not covered"), ("??", "required, copies unknown"),
          ("--", "not covered (not required)"),
          ("HA", "covered by HA (enabled, admitted, failover-tested)")]
MARKS = {"OK": "✓", "ok": "✓", "!!": "!", "XX": "✗", "--": "", "stale": "✓", "??": "?",
         "HA": "HA"}

def _state(lc: LevelCoverage) -> str:
    c = report.cell(lc)
    return "stale" if lc.stale and c in ("OK", "ok") else c


def heatmap(plan: Plan) -> dict[str, Any]:
    """Geometry and content of the coverage heatmap (drawn by heatmap.svg)."""
    cov = plan.coverage
    names = list(cov.vms)
    keys = taxonomy.LEVEL_KEYS
    left, top, cw, ch = 150, 130, 62, 34
    w = max(left + cw * len(keys) + 110, 40 + sum(30 + 7 * len(t) for _, t in LEGEND))
    columns = [{"x": left + j * cw + cw / 2, "y": top - 8, "text": taxonomy.level(k).title}
               for j, k in enumerate(keys)]
    rows = []
    for i, n in enumerate(names):
        y = top + i * ch
        cells = []
        for j, k in enumerate(keys):
            lc = cov.vms[n].levels[k]
            st = _state(lc)
            x = left + j * cw
            cells.append({
                "x": x + 1, "y": y + 1, "w": cw - 2, "h": ch - 2, "fill": COLOURS[st],
                "level": k, "tip": lc.gap or (
                    f"covered: {len(lc.copies)} copies, RPO {fmt_duration(lc.rpo_s)}, RTO ≈ "
                    f"{fmt_duration(lc.rto_estimate_s)}" if lc.covered else ""),
                "tx": x + cw / 2, "ty": y + ch / 2 + 5, "mark": MARKS[st],
                "colour": "#fff" if st in ("OK", "XX", "??", "HA") else "#333"})
        rows.append({"name": n, "x": left - 8, "y": y + ch / 2 + 4, "cells": cells})
    legend = []
    ly, lx = top + ch * len(names) + 22.0, 10.0
    for st, label in LEGEND:
        legend.append({"x": lx, "y": ly, "fill": COLOURS[st], "label": label})
        lx += 30 + 7 * len(label)
    return {"width": w, "height": top + ch * len(names) + 70, "columns": columns,
            "rows": rows, "legend": legend}


def targets_chart(plan: Plan) -> dict[str, Any]:
    """Achieved RPO and estimated RTO as bars against each VM's targets: the worst of the
    levels the VM must survive (the VM level when it names none). Drawn by targets.svg."""
    cov, inv = plan.coverage, plan.inv
    rows = []
    for n, vc in cov.vms.items():
        req = [lc for lc in vc.levels.values() if lc.required] or [vc.levels["vm"]]
        order = list(vc.levels)  # ties go to the widest level
        worst_rpo = max(req, key=lambda lc: (lc.rpo_s is None, lc.rpo_s or 0,
                                             order.index(lc.level)))
        worst_rto = max(req, key=lambda lc: (lc.rto_estimate_s is None,
                                             round(lc.rto_estimate_s or 0),
                                             order.index(lc.level)))
        rows.append((f"{n} RPO ({worst_rpo.level})", worst_rpo.rpo_s, inv.rpo_target(vc.vm)))
        rows.append((f"{n} RTO ({worst_rto.level})", worst_rto.rto_estimate_s,
                     inv.rto_target(vc.vm)))
    left, bw, rh = 210, 520, 20
    bars = []
    for i, (what, value, target) in enumerate(rows):
        width: float
        if value is None:
            label, width, colour = "no copy", bw, "#d73027"
        elif target is None:
            label, width, colour = f"{fmt_duration(value)} (no target)", bw * 0.08, "#2c7bb6"
        else:
            ratio = value / target if target else 2.0
            width = bw * min(ratio, 2.0) / 2
            colour = "#1a9850" if ratio <= 1 else "#d73027"
            label = f"{fmt_duration(value)} of {fmt_duration(target)}"
        bars.append({"y": 24 + i * rh, "what": what, "width": max(width, 2),
                     "colour": colour, "label": label})
    return {"width": left + bw + 260, "height": 40 + rh * len(rows), "left": left, "bw": bw,
            "bh": rh - 4, "mid": left + bw / 2, "right": left + bw, "rows": bars}


def copies_by_location(plan: Plan) -> list[dict[str, Any]]:
    cov, inv = plan.coverage, plan.inv
    rows = []
    for r in inv.repositories.values():
        st = cov.repos[r.name]
        chips = []
        for n in cov.vms:
            mine = [c for c in st.copies if c.vm == n]
            if mine:
                chips.append({"vm": n, "count": len(mine),
                              "age": (cov.now - max(c.time for c in mine)).total_seconds()})
        state = "ok" if st.reachable else "stale" if st.stale else "unreadable"
        rows.append({"location": inv.label(r.location), "name": r.name, "state": state,
                     "kind": r.media + (", immutable" if r.immutable else ""),
                     "chips": chips})
    return rows


def cards(plan: Plan) -> list[dict[str, str]]:
    cov = plan.coverage
    req = [lc for vc in cov.vms.values() for lc in vc.levels.values() if lc.required]
    ok = sum(1 for lc in req if report.cell(lc) in ("OK", "HA"))
    rule = sum(1 for vc in cov.vms.values() if vc.rule.ok)
    n1 = all(h.fits for h in cov.n1)
    items = [(f"{ok}/{len(req)}", "required levels met", "good" if ok == len(req) else "bad"),
             (str(len(plan.gaps)), "open gaps", "good" if not plan.gaps else "warn"),
             (f"{rule}/{len(cov.vms)}", "VMs meet 3-2-1-1-0",
              "good" if rule == len(cov.vms) else "warn"),
             ("yes" if n1 else "no", "N+1 hosts", "good" if n1 else "bad"),
             (str(len(cov.vms)), "VMs", "info")]
    return [{"value": v, "label": label, "cls": cls} for v, label, cls in items]


def markdown_blocks(md: str) -> list[dict[str, Any]]:
    """The subset render_md writes, as blocks for markdown.html: headings, tables, list
    items, code blocks, quotes, paragraphs (inline text stays Markdown: the template's
    ``inline`` filter escapes it and renders `code` and **bold**)."""
    out: list[dict[str, Any]] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if s.startswith("```"):
            j = i + 1
            code = []
            while j < len(lines) and not lines[j].strip().startswith("```"):
                code.append(lines[j].strip())
                j += 1
            out.append({"kind": "pre", "text": "\n".join(code)})
            i = j + 1
            continue
        if s.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i].strip())
                i += 1
            cells = [re.split(r"(?<!\\)\|", r.strip("|")) for r in rows if "---|" not in r]
            out.append({"kind": "table", "rows": [[c.strip().replace("\\|", "|") for c in row]
                                                  for row in cells]})
            continue
        m = re.match(r"^(#{1,4}) (.*)$", s)
        if m:
            out.append({"kind": "heading", "level": len(m.group(1)), "text": m.group(2)})
        elif s.startswith(">"):
            quote = []
            while i < len(lines) and lines[i].startswith(">"):
                quote.append(lines[i][1:].strip())
                i += 1
            out.append({"kind": "quote",
                        "head": [q for q in quote if q and not q.startswith("- ")],
                        "items": [q[2:] for q in quote if q.startswith("- ")]})
            continue
        elif re.match(r"^\s*(- |\d+\. )", line):
            out.append({"kind": "item", "depth": (len(line) - len(line.lstrip())) // 2,
                        "text": re.sub(r"^(- |\d+\. )", "", s)})
        elif s:
            out.append({"kind": "paragraph", "text": s})
        i += 1
    return out


def render(plan: Plan) -> str:
    s = plan.inv.settings
    body = render_md.render(plan, banner=False).split("\n", 1)[1]  # the title is drawn below
    env = templating.environment("vmdr.plan")
    env.filters.setdefault("duration", fmt_duration)
    return env.get_template("plan.html").render(
        title=s.title, organisation=s.organisation, source=plan.inv.path,
        generated=format_time(plan.generated)[:16].replace("T", " "),
        banner=report.source_lines(plan.coverage), cards=cards(plan), heat=heatmap(plan),
        bars=targets_chart(plan), locations=copies_by_location(plan),
        blocks=markdown_blocks(body))
