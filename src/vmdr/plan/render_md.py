"""The plan as Markdown, in the order of a NIST SP 800-34 contingency plan."""

from __future__ import annotations

from datetime import datetime

from vmdr.plan import hotsite, report, taxonomy
from vmdr.plan.runbook import Plan, Scenario
from vmdr.plan.units import fmt_duration, fmt_size
from vmdr.storage.registry import redact
from vmdr.timeutil import format_time

SECTIONS = ("Scope and inventory", "Roles and contacts", "Activation criteria",
            "Recovery procedures", "Validation and reconstitution",
            "Test schedule and last results", "Coverage and open gaps")


def _t(t: datetime | None) -> str:
    return format_time(t)[:16].replace("T", " ") + " UTC" if t else "never"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(head: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return [*out, ""]


def _inventory(plan: Plan) -> list[str]:
    inv, cov = plan.inv, plan.coverage
    out = [f"## 1. {SECTIONS[0]}", ""]
    if inv.settings.scope:
        out += [inv.settings.scope, ""]
    out += ["### Locations", ""]
    roots = [loc for loc in inv.locations.values() if loc.parent is None]

    def walk(lid: str, depth: int) -> None:
        loc = inv.locations[lid]
        here = [h for h in inv.hosts.values() if h.location == lid]
        repos = [r.name for r in inv.repositories.values() if r.location == lid]
        vaults = [v.name for v in inv.vaults.values() if v.location == lid]
        extra = "".join([f"; hosts {', '.join(h.name for h in here)}" if here else "",
                         f"; repositories {', '.join(repos)}" if repos else "",
                         f"; vaults {', '.join(vaults)}" if vaults else ""])
        out.append(f"{'  ' * depth}- {loc.name} ({loc.kind}){extra}")
        for child in sorted(c.id for c in inv.locations.values() if c.parent == lid):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda x: x.id):
        walk(root.id, 0)
    out += ["", "### Hosts", ""]
    rows: list[list[object]] = []
    for h in inv.hosts.values():
        st = cov.hosts[h.name]
        state = ("discovered now" if st.reachable else
                 f"STALE: cached {fmt_duration((plan.generated - st.read_at).total_seconds())} "
                 "ago" if st.read_at else f"not reached: {st.error}")
        cap = f"{h.vcpus or '?'} vCPU, {fmt_size(h.memory) if h.memory else '? memory'}"
        rows.append([h.name, inv.label(h.location), h.uri or "—", cap,
                     ", ".join(sorted(v.name for v in inv.vms.values() if v.host == h.name)),
                     state])
    out += table(["Host", "Location", "libvirt URI", "Capacity", "VMs", "Facts"], rows)
    out += ["### Repositories and vaults", ""]
    rows = []
    for r in inv.repositories.values():
        rs = cov.repos[r.name]
        state = ("read now" if rs.reachable else
                 f"STALE: cached {fmt_duration((plan.generated - rs.read_at).total_seconds())} "
                 f"ago ({rs.error})" if rs.read_at else f"NOT READABLE: {rs.error}")
        kind = r.media + (", immutable" if r.immutable else "") + \
            (f", vault {r.vault}" if r.vault else "")
        tp, how = cov.throughput[r.name]
        rows.append([r.name, redact(r.url), inv.label(r.location), kind, len(rs.copies),
                     f"{fmt_size(tp)}/s ({how})", state])
    out += table(["Repository", "URL", "Location", "Media", "Copies", "Restore rate", "State"],
                 rows)
    if inv.vaults:
        out += table(["Vault", "Location", "Retrieval time"],
                     [[v.name, inv.label(v.location), fmt_duration(v.retrieval_s)]
                      for v in inv.vaults.values()])
    out += ["### Virtual machines", ""]
    rows = []
    for name, vc in cov.vms.items():
        vm = vc.vm
        rows.append([name + ("" if vm.declared else " (not in inventory)"),
                     f"{vm.owner} {vm.contact}".strip() or "—", vm.tier or "—",
                     fmt_duration(inv.rpo_target(vm)), fmt_duration(inv.rto_target(vm)),
                     ", ".join(inv.required_levels(vm)), vc.host,
                     f"{vc.need.vcpus or '?'} vCPU, {fmt_size(vc.need.memory)}, disks "
                     f"{fmt_size(vc.disk_bytes)}", _state(vc.state, vc.facts_age_s),
                     ", ".join(vm.depends_on) or "—", vm.boot_group])
    out += table(["VM", "Owner / contact", "Tier", "RPO", "RTO", "Must survive", "Host",
                  "Size", "State", "Depends on", "Boot group"], rows)
    return out


def _state(state: str | None, age: float | None) -> str:
    if state is None:
        return "unknown (not discovered)"
    if age:
        return f"{state} (STALE: seen {fmt_duration(age)} ago)"
    return state


def _roles(plan: Plan) -> list[str]:
    inv = plan.inv
    out = [f"## 2. {SECTIONS[1]}", ""]
    rows: list[list[object]] = []
    for r in inv.roles.values():
        restores = sorted(n for n in inv.vms if r.restores_vm(n))
        rows.append([r.title, r.person, r.contact, "yes" if r.declares else "",
                     ", ".join(restores) or "—", "; ".join(r.duties)])
    out += table(["Role", "Person", "Contact", "Declares", "Restores", "Duties"], rows)
    if not inv.declarers():
        out += ["**No role may declare a disaster.** Set `declares = true` on a role.", ""]
    return out


def _activation(plan: Plan) -> list[str]:
    lead = ", ".join(r.title for r in plan.inv.declarers()) or "(nobody: add a role)"
    out = [f"## 3. {SECTIONS[2]}", "", f"A disaster is declared by: **{lead}**.", ""]
    rows: list[list[object]] = [[lv.title, lv.example, lv.activation, lv.recovery]
                                for lv in taxonomy.LEVELS]
    return out + table(["Level", "Examples", "Activate when", "Recovery method"], rows)


def _scenario(sc: Scenario) -> list[str]:
    titles = ", ".join(taxonomy.level(k).title for k in sc.levels)
    out = [f"### {sc.id}. {sc.title}", "", f"Disaster levels: {titles}.", ""]
    if sc.blast.hosts or sc.blast.repos:
        out.append(f"Lost: hosts {', '.join(sorted(sc.blast.hosts)) or 'none'}; repositories "
                   f"{', '.join(sorted(sc.blast.repos)) or 'none'}.")
    if sc.id == "S0":
        out.append("Restore only the failed VM, in place, after the application's own "
                   "recovery (watchdog, restart) did not help.")
    if sc.id == "S0":
        out += ["", "Each VM is restored on its own; its line shows the estimated time.", ""]
    else:
        out += ["", "Estimated time until every affected VM is up: "
                f"**{fmt_duration(sc.total_s)}** (restores onto one host run one after "
                "another; boots follow the groups).", ""]
    for p in sc.problems:
        out.append(f"- **Problem:** {p}")
    if sc.problems:
        out.append("")
    groups = sorted({s.boot_group for s in sc.steps})
    for g in groups:
        out += [f"#### Boot group {g}", ""]
        for s in (x for x in sc.steps if x.boot_group == g):
            if s.ha:
                out.append(f"- **{s.vm}**: {s.ha}; owner {s.owner}; up at ≈ "
                           f"{fmt_duration(s.up_s)}")
                continue
            copy = (f"{s.copy.repo} snapshot {s.copy.short_id} of {_t(s.copy.time)}"
                    if s.copy else "no copy")
            deps = f", after {', '.join(s.depends_on)}" if s.depends_on else ""
            out.append(f"- **{s.vm}** → {s.target or 'replacement host'} from {copy}{deps}; "
                       f"owner {s.owner}; restore ≈ {fmt_duration(s.retrieval_s + s.restore_s)}"
                       f", boot ≈ {fmt_duration(s.boot_s)}, up at ≈ {fmt_duration(s.up_s)}")
            if s.command:
                out += ["", "  ```sh", f"  {s.command}", "  ```"]
        out.append("")
    out += ["Task list:", ""]
    out += table(["#", "Task", "Owner", "Depends on", "Duration"],
                 [[t.id, t.title + (f" — `{t.command}`" if t.command and t.id.startswith("T")
                                    else ""), t.owner, ", ".join(t.depends) or "—",
                   fmt_duration(t.duration_s)] for t in sc.tasks])
    return out


VALIDATION = [
    "Each restored VM: `vmdr restore --start` reported a heartbeat (guest agent or console).",
    "The VM's owner runs the application checks and confirms the data's point in time "
    "(the snapshot time in the procedure).",
    "Dependencies answer: databases before applications, applications before web tiers.",
    "Network: addresses, DNS and firewall rules at the recovery site point at the restored VMs.",
]
RECONSTITUTION = [
    "Back up every restored VM at once (`vmdr backup VM`) so the new location has copies.",
    "Re-establish copies outside the new blast radius (`vmdr copy` to a repository elsewhere).",
    "Run `vmdr plan check` until it exits 0; update the inventory (`host = ...`).",
    "Fail back to the original site in a maintenance window once it is repaired: back up at "
    "the recovery site, restore at the original site, verify, then retire the recovery copies.",
    "Close the incident: record the timeline, actual RTO/RPO, and lessons learned in this plan.",
]


def render(plan: Plan, *, banner: bool = True) -> str:
    inv, cov = plan.inv, plan.coverage
    s = inv.settings
    out = [f"# {s.title}", ""]
    if s.organisation:
        out += [f"**{s.organisation}**", ""]
    out += [f"Generated {_t(plan.generated)} by `vmdr plan write` from `{inv.path}`.", ""]
    src = report.source_lines(cov)
    if src and banner:
        out += ["> **Based on incomplete information** — check before relying on it:", ">"]
        out += [f"> - {line}" for line in src] + [""]
    out += _inventory(plan) + _roles(plan) + _activation(plan)
    out += [f"## 4. {SECTIONS[3]}", ""]
    for sc in plan.scenarios:
        out += _scenario(sc)
    out += [f"## 5. {SECTIONS[4]}", "", "Validation:", ""]
    out += [f"{i}. {t}" for i, t in enumerate(VALIDATION, 1)] + ["", "Reconstitution:", ""]
    out += [f"{i}. {t}" for i, t in enumerate(RECONSTITUTION, 1)] + [""]
    out += [f"## 6. {SECTIONS[5]}", "",
            f"Every VM is restored and booted in a test at least every "
            f"{fmt_duration(s.test_interval_s)}; boot verification must be younger than "
            f"{fmt_duration(s.verify_max_age_s)}.", ""]
    out += table(["VM", "Last test", "Result", "Heartbeat", "Copy", "Next due"],
                 [[t.vm, _t(t.last.time) if t.last else "never",
                   t.last.status if t.last else "—",
                   fmt_duration(t.last.heartbeat_s) if t.last else "—", t.copy or "—",
                   ("OVERDUE" if t.overdue else _t(t.next_due))] for t in plan.tests])
    out += [f"## 7. {SECTIONS[6]}", "", "Coverage (OK covered and required, ok covered, "
            "!! target missed, XX required but not covered, ?? required but copies unknown "
            "(repository unreadable), -- not covered):", ""]
    keys = taxonomy.LEVEL_KEYS
    out += table(["VM", *(report.SHORT[k] for k in keys), "RPO", "RTO", "3-2-1-1-0"],
                 [[n, *(report.cell(vc.levels[k]) for k in keys),
                   fmt_duration(vc.levels["vm"].rpo_s),
                   fmt_duration(vc.levels["vm"].rto_estimate_s),
                   "ok" if vc.rule.ok else "no"] for n, vc in cov.vms.items()])
    out += ["Open gaps:", ""] + [f"- {g}" for g in plan.gaps] if plan.gaps else ["No open gaps."]
    if cov.hotsite is not None:
        out += ["", *hotsite.markdown(cov.hotsite)]
    return "\n".join(out) + "\n"
