"""The plan as one self-contained HTML page: inline CSS and SVG, no external assets.

At the top, what people look at: a coverage heatmap (VMs × disaster levels), RPO and RTO
against targets, and copies by location. Below, the full written plan (the Markdown
rendering of :mod:`render_md`, converted here; it uses a small, known subset).
"""

from __future__ import annotations

import html
import re

from vmdr.plan import render_md, report, taxonomy
from vmdr.plan.coverage import LevelCoverage
from vmdr.plan.runbook import Plan
from vmdr.plan.units import fmt_duration
from vmdr.timeutil import format_time

COLOURS = {"OK": "#1a9850", "ok": "#a6d96a", "!!": "#fdae61", "XX": "#d73027",
           "--": "#e0e0e0", "stale": "#fee08b", "??": "#9e9ac8"}
LEGEND = [("OK", "covered (required)"), ("ok", "covered (not required)"),
          ("!!", "covered, target missed"), ("stale", "covered by a stale reading"),
          ("XX", "required, not covered"), ("??", "required, copies unknown"),
          ("--", "not covered (not required)")]
CSS = """
body{font-family:'DejaVu Sans',Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222;
 font-size:14px;line-height:1.45}
h1{font-size:26px;margin-bottom:4px}h2{border-bottom:2px solid #2c7bb6;padding-bottom:4px;
 margin-top:36px}h3{margin-top:26px;color:#2c7bb6}h4{margin:14px 0 4px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #ccc;padding:4px 7px;vertical-align:top;text-align:left}
th{background:#f0f4f8}pre{background:#f6f8fa;border:1px solid #ddd;padding:8px;
 white-space:pre-wrap;word-break:break-all;font-size:12px}
code{background:#f3f3f3;padding:1px 3px;border-radius:3px;font-size:12px}
blockquote{border-left:5px solid #d73027;background:#fff4f2;margin:10px 0;padding:6px 14px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:16px 0}
.card{border-radius:8px;padding:12px 18px;min-width:150px;color:#fff}
.card b{display:block;font-size:28px}.good{background:#1a9850}.bad{background:#d73027}
.warn{background:#f46d43}.info{background:#2c7bb6}
.panel{border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:16px 0;
 background:#fcfcfc}.muted{color:#666;font-size:12px}
.chip{display:inline-block;border-radius:10px;padding:1px 8px;margin:2px;font-size:12px;
 color:#fff}
svg{max-width:100%;height:auto}
@media print{.panel,tr,pre{break-inside:avoid}h2{break-before:page}}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _state(lc: LevelCoverage) -> str:
    c = report.cell(lc)
    return "stale" if lc.stale and c in ("OK", "ok") else c


def heatmap(plan: Plan) -> str:
    cov = plan.coverage
    names = list(cov.vms)
    keys = taxonomy.LEVEL_KEYS
    left, top, cw, ch = 150, 130, 62, 34
    w = max(left + cw * len(keys) + 110, 40 + sum(30 + 7 * len(t) for _, t in LEGEND))
    h = top + ch * len(names) + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="heatmap" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="coverage heatmap">']
    for j, k in enumerate(keys):
        x = left + j * cw + cw / 2
        out.append(f'<text x="{x}" y="{top - 8}" transform="rotate(-40 {x} {top - 8})" '
                   f'font-size="12">{_e(taxonomy.level(k).title)}</text>')
    for i, n in enumerate(names):
        y = top + i * ch
        out.append(f'<text x="{left - 8}" y="{y + ch / 2 + 4}" text-anchor="end" '
                   f'font-size="13" font-weight="bold">{_e(n)}</text>')
        for j, k in enumerate(keys):
            lc = cov.vms[n].levels[k]
            st = _state(lc)
            tip = lc.gap or (f"covered: {len(lc.copies)} copies, RPO "
                             f"{fmt_duration(lc.rpo_s)}, RTO ≈ "
                             f"{fmt_duration(lc.rto_estimate_s)}" if lc.covered else "")
            x = left + j * cw
            out.append(f'<rect x="{x + 1}" y="{y + 1}" width="{cw - 2}" height="{ch - 2}" '
                       f'rx="4" fill="{COLOURS[st]}"><title>{_e(n)} / {_e(k)}: {_e(tip)}'
                       f'</title></rect>')
            mark = {"OK": "✓", "ok": "✓", "!!": "!", "XX": "✗", "--": "", "stale": "✓",
                    "??": "?"}[st]
            colour = "#fff" if st in ("OK", "XX", "??") else "#333"
            out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 5}" text-anchor="middle" '
                       f'font-size="15" fill="{colour}">{mark}</text>')
    ly, lx = top + ch * len(names) + 22.0, 10.0
    for st, label in LEGEND:
        out.append(f'<rect x="{lx}" y="{ly}" width="16" height="16" rx="3" '
                   f'fill="{COLOURS[st]}"/><text x="{lx + 22}" y="{ly + 13}" '
                   f'font-size="12">{_e(label)}</text>')
        lx += 30 + 7 * len(label)
    out.append("</svg>")
    return "".join(out)


def targets_chart(plan: Plan) -> str:
    """Achieved RPO and estimated RTO as bars against each VM's targets: the worst of the
    levels the VM must survive (the VM level when it names none)."""
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
    w, h = left + bw + 260, 40 + rh * len(rows)
    mid = left + bw / 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="targets" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="RPO and RTO against targets">',
           f'<text x="{mid}" y="14" text-anchor="middle" font-size="12">target</text>',
           f'<text x="{left + bw}" y="14" text-anchor="end" font-size="12">2× target</text>']
    for i, (what, value, target) in enumerate(rows):
        y = 24 + i * rh
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end" font-size="12">'
                   f'{_e(what)}</text>')
        out.append(f'<rect x="{left}" y="{y + 2}" width="{bw}" height="{rh - 4}" '
                   f'fill="#f0f0f0"/>')
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
        out.append(f'<rect x="{left}" y="{y + 2}" width="{max(width, 2):.1f}" '
                   f'height="{rh - 4}" fill="{colour}"/>')
        out.append(f'<text x="{left + bw + 8}" y="{y + 13}" font-size="12">{_e(label)}</text>')
    out.append(f'<line x1="{mid}" y1="18" x2="{mid}" y2="{h}" stroke="#333" '
               f'stroke-dasharray="4 3"/></svg>')
    return "".join(out)


def copies_by_location(plan: Plan) -> str:
    cov, inv = plan.coverage, plan.inv
    rows = []
    for r in inv.repositories.values():
        st = cov.repos[r.name]
        chips = []
        for n in cov.vms:
            mine = [c for c in st.copies if c.vm == n]
            if mine:
                age = (cov.now - max(c.time for c in mine)).total_seconds()
                chips.append(f'<span class="chip" style="background:#2c7bb6">{_e(n)} '
                             f'×{len(mine)}, newest {fmt_duration(age)} ago</span>')
        state = "" if st.reachable else (
            ' <span class="chip" style="background:#f46d43">stale</span>' if st.stale else
            ' <span class="chip" style="background:#d73027">not readable</span>')
        kind = r.media + (", immutable" if r.immutable else "")
        rows.append(f"<tr><td>{_e(inv.label(r.location))}</td><td><b>{_e(r.name)}</b> "
                    f"({_e(kind)}){state}</td><td>{''.join(chips) or '—'}</td></tr>")
    return ("<table><tr><th>Location</th><th>Repository</th><th>Copies (VM × snapshots)</th>"
            "</tr>" + "".join(rows) + "</table>")


def banner(plan: Plan) -> str:
    """Say first, in red, what the page could not see."""
    lines = report.source_lines(plan.coverage)
    if not lines:
        return ""
    items = "".join(f"<li>{_e(line)}</li>" for line in lines)
    return (f"<blockquote><b>Based on incomplete information</b> — {len(lines)} source(s) "
            f"could not be read now; check before relying on this page:<ul>{items}</ul>"
            "</blockquote>")


def cards(plan: Plan) -> str:
    cov = plan.coverage
    req = [lc for vc in cov.vms.values() for lc in vc.levels.values() if lc.required]
    ok = sum(1 for lc in req if report.cell(lc) == "OK")
    rule = sum(1 for vc in cov.vms.values() if vc.rule.ok)
    n1 = all(h.fits for h in cov.n1)
    items = [(f"{ok}/{len(req)}", "required levels met", "good" if ok == len(req) else "bad"),
             (str(len(plan.gaps)), "open gaps", "good" if not plan.gaps else "warn"),
             (f"{rule}/{len(cov.vms)}", "VMs meet 3-2-1-1-0",
              "good" if rule == len(cov.vms) else "warn"),
             ("yes" if n1 else "no", "N+1 hosts", "good" if n1 else "bad"),
             (str(len(cov.vms)), "VMs", "info")]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}"><b>{_e(v)}</b>{_e(label)}</div>'
        for v, label, cls in items) + "</div>"


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>")]


def _inline(text: str) -> str:
    out = _e(text).replace("&#x27;", "'")
    for rx, rep in _INLINE:
        out = rx.sub(rep, out)
    return out


def markdown_to_html(md: str) -> str:
    """The subset render_md writes: headings, tables, lists, code blocks, quotes."""
    out: list[str] = []
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
            out.append(f"<pre>{_e(chr(10).join(code))}</pre>")
            i = j + 1
            continue
        if s.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i].strip())
                i += 1
            cells = [re.split(r"(?<!\\)\|", r.strip("|")) for r in rows if "---|" not in r]
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{t}>{_inline(c.strip().replace(chr(92) + '|', '|'))}</{t}>"
                                 for c in row) + "</tr>"
                for n, row in enumerate(cells) for t in ["th" if n == 0 else "td"]) + "</table>")
            continue
        m = re.match(r"^(#{1,4}) (.*)$", s)
        if m:
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif s.startswith(">"):
            quote = []
            while i < len(lines) and lines[i].startswith(">"):
                quote.append(lines[i][1:].strip())
                i += 1
            items = "".join(f"<li>{_inline(q[2:])}</li>" for q in quote if q.startswith("- "))
            head = "".join(_inline(q) for q in quote if q and not q.startswith("- "))
            out.append(f"<blockquote>{head}<ul>{items}</ul></blockquote>")
            continue
        elif re.match(r"^\s*(- |\d+\. )", line):
            depth = (len(line) - len(line.lstrip())) // 2
            text = re.sub(r"^(- |\d+\. )", "", s)
            out.append(f'<div style="margin-left:{depth * 18 + 4}px">• {_inline(text)}</div>')
        elif s:
            out.append(f"<p>{_inline(s)}</p>")
        i += 1
    return "\n".join(out)


def render(plan: Plan) -> str:
    s = plan.inv.settings
    body = render_md.render(plan, banner=False).split("\n", 1)[1]  # the title is drawn below
    gen = format_time(plan.generated)[:16].replace("T", " ")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(s.title)}'
            f'</title><style>{CSS}</style></head><body><h1>{_e(s.title)}</h1>'
            f'<div class="muted">{_e(s.organisation + " — " if s.organisation else "")}generated '
            f'{gen} UTC from {_e(plan.inv.path)}</div>'
            f'{banner(plan)}{cards(plan)}<div class="panel"><h3>Coverage by disaster level</h3>'
            f'{heatmap(plan)}</div><div class="panel"><h3>RPO and RTO against targets '
            f'(worst required level)</h3>{targets_chart(plan)}</div>'
            f'<div class="panel"><h3>Copies by location</h3>{copies_by_location(plan)}</div>'
            f'{markdown_to_html(body)}</body></html>\n')
