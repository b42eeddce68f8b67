"""Coverage as JSON and as terminal text; the freshness of what it is based on."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vmdr.plan import taxonomy
from vmdr.plan.coverage import Coverage, LevelCoverage, VMCoverage
from vmdr.plan.units import fmt_duration, fmt_size
from vmdr.timeutil import format_time

SHORT = {"application": "app", "vm": "vm", "host": "host", "communication": "net",
         "rack": "rack", "datacenter": "dc", "building": "bldg", "campus": "camp",
         "city": "city", "region": "reg", "country": "ctry", "multinational": "multi"}


def _t(t: datetime | None) -> str | None:
    return format_time(t) if t else None


def cell(lc: LevelCoverage) -> str:
    """One matrix cell: OK / ok (covered, required / not), !! (target missed), XX, ??
    (required, not covered, but a repository that could hold a copy was unreadable), --."""
    if lc.ha and (lc.rto_met is not False):
        return "HA"
    if not lc.covered:
        if not lc.required:
            return "--"
        return "??" if lc.unknown else "XX"
    if lc.required and (lc.rpo_met is False or lc.rto_met is False):
        return "!!"
    return "OK" if lc.required else "ok"


def level_json(cov: Coverage, lc: LevelCoverage) -> dict[str, Any]:
    per_repo: dict[str, dict[str, Any]] = {}
    for c in lc.copies:
        d = per_repo.setdefault(c.repo, {
            "repo": c.repo, "media": cov.inv.repositories[c.repo].media, "snapshots": 0,
            "newest": c.snapshot, "newest_time": _t(c.time), "stale": cov.repos[c.repo].stale})
        d["snapshots"] += 1
    return {
        "covered": lc.covered, "required": lc.required, "blast_radius": lc.blast.label,
        "copies": list(per_repo.values()), "rpo_s": lc.rpo_s,
        "rto_estimate_s": None if lc.rto_estimate_s is None else round(lc.rto_estimate_s, 1),
        "restore_from": ({"repo": lc.chosen.repo, "snapshot": lc.chosen.snapshot}
                         if lc.chosen else None),
        "last_verified": _t(lc.last_verified), "rpo_met": lc.rpo_met, "rto_met": lc.rto_met,
        "stale": lc.stale, "unknown_copies": lc.unknown, "gap": lc.gap,
        **({"ha": lc.ha, "ha_gap": lc.ha_gap} if lc.level == "host" else {}),
        "replica": lc.replica,
    }


def vm_json(cov: Coverage, vc: VMCoverage) -> dict[str, Any]:
    inv, vm = cov.inv, vc.vm
    return {
        "host": vc.host, "in_inventory": vm.declared, "owner": vm.owner, "contact": vm.contact,
        "tier": vm.tier, "rpo_target_s": inv.rpo_target(vm), "rto_target_s": inv.rto_target(vm),
        "must_survive": list(inv.required_levels(vm)), "depends_on": list(vm.depends_on),
        "boot_group": vm.boot_group, "vcpus": vc.need.vcpus, "memory": vc.need.memory,
        "disk_bytes": vc.disk_bytes, "state": vc.state, "facts_age_s": vc.facts_age_s,
        "boot_estimate_s": vc.boot_s, "last_verified": _t(vc.last_verified),
        "levels": {k: level_json(cov, lc) for k, lc in vc.levels.items()},
        "rule_32110": {**vars(vc.rule), "ok": vc.rule.ok, "missing": vc.rule.missing()},
        "problems": vc.problems,
    }


def sources_json(cov: Coverage) -> dict[str, Any]:
    def age(t: datetime | None) -> float | None:
        return None if t is None else (cov.now - t).total_seconds()
    return {
        "hosts": {h.name: {"reachable": h.reachable, "stale": h.stale, "read_at": _t(h.read_at),
                           "age_s": age(h.read_at), "error": h.error, "vms": len(h.vms)}
                  for h in cov.hosts.values()},
        "repositories": {r.name: {"reachable": r.reachable, "stale": r.stale,
                                  "read_at": _t(r.read_at), "age_s": age(r.read_at),
                                  "error": r.error, "copies": len(r.copies),
                                  "restore_throughput": round(cov.throughput[r.name][0]),
                                  "throughput_source": cov.throughput[r.name][1]}
                         for r in cov.repos.values()},
    }


def to_json(cov: Coverage) -> dict[str, Any]:
    return {
        "generated": format_time(cov.now), "config": cov.inv.path,
        "levels": [{"key": lv.key, "title": lv.title, "scope": lv.scope,
                    "recommendation": lv.recovery} for lv in taxonomy.LEVELS],
        "sources": sources_json(cov), "warnings": cov.inv.warnings,
        "vms": {n: vm_json(cov, vc) for n, vc in cov.vms.items()},
        "n_plus_1": [{"host": h.host, "vms": h.vms, "fits": h.fits, "placement": h.placement,
                      "problem": h.problem} for h in cov.n1],
        "n_plus_1_source": cov.n1_source,
        "ha": ha_json(cov),
        "problems": cov.problems(),
    }


def ha_json(cov: Coverage) -> dict[str, Any]:
    """The host-level HA rule per HA VM, and where the facts came from."""
    ha = cov.ha
    vms = {}
    for n, vc in cov.vms.items():
        lc = vc.levels.get("host")
        if lc is None or not cov.inv.ha_enabled(vc.vm):
            continue
        f = ha.vms.get(n) if ha else None
        vms[n] = {"covered": lc.ha, "reason": lc.ha_gap,
                  "admitted": f.admitted if f else None,
                  "last_test": _t(f.last_test) if f else None,
                  "test_kind": f.test_kind if f else None, "test_to": f.test_to if f else None}
    return {"source": ha.source if ha else "not read", "note": ha.note if ha else None,
            "test_interval_s": cov.inv.settings.test_interval_s, "vms": vms}


def ha_lines(cov: Coverage) -> list[str]:
    doc = ha_json(cov)
    if not doc["vms"]:
        return []
    out = [f"HA at the host level (from {doc['source']}; failover tested within "
           f"{fmt_duration(doc['test_interval_s'])}):"]
    if doc["note"]:
        out.append(f"  ! {doc['note']}")
    for n, d in doc["vms"].items():
        out.append(f"  - {n}: " + ("covered by HA" + (f" (last {d['test_kind']} "
                                                       f"{d['last_test'][:19]}Z → "
                                                       f"{d['test_to']})" if d["last_test"]
                                                      else "")
                                   if d["covered"] else str(d["reason"])))
    return out


def source_lines(cov: Coverage) -> list[str]:
    """One line per host or repository that is not read fresh."""
    out = []
    for h in cov.hosts.values():
        if not h.reachable:
            how = (f"using discovery cached {fmt_duration((cov.now - h.read_at).total_seconds())}"
                   " ago (stale)" if h.read_at else "nothing cached: sizes come from the "
                   "inventory and the snapshots")
            what = ("not discovered (no uri configured)" if h.error == "no uri configured"
                    else f"not reached ({h.error})")
            out.append(f"host {h.name}: {what}; {how}")
    for r in cov.repos.values():
        if not r.reachable:
            how = (f"using copies cached {fmt_duration((cov.now - r.read_at).total_seconds())}"
                   " ago (stale)" if r.read_at else "NO COPIES KNOWN from it")
            out.append(f"repository {r.name}: not readable ({r.error}); {how}")
    return out


def to_text(cov: Coverage) -> list[str]:
    keys = taxonomy.LEVEL_KEYS
    width = max([4, *(len(n) for n in cov.vms)])
    lines = [f"coverage at {format_time(cov.now)[:19]}Z ({cov.inv.path})", ""]
    src = source_lines(cov)
    if src or cov.inv.warnings:
        lines += ["based on:", *(f"  ! {s}" for s in src + cov.inv.warnings), ""]
    lines += [f"{'VM':<{width}}  {'HOST':<8} " + " ".join(f"{SHORT[k]:>5}" for k in keys)
              + "   RPO(vm)  RTO(vm)  3-2-1-1-0"]
    for n, vc in cov.vms.items():
        vmlc = vc.levels["vm"]
        lines.append(f"{n:<{width}}  {vc.host:<8} "
                     + " ".join(f"{cell(vc.levels[k]):>5}" for k in keys)
                     + f"   {fmt_duration(vmlc.rpo_s):>7}  {fmt_duration(vmlc.rto_estimate_s):>7}"
                     + f"  {'ok' if vc.rule.ok else 'NO'}")
    lines += ["", "OK covered (required)  ok covered  !! covered, target missed  "
              "XX required, not covered  ?? required, copies unknown (unreadable "
              "repository)  -- not covered  HA covered by HA (host level)", ""]
    gaps = [lc.gap for vc in cov.vms.values() for lc in vc.levels.values()
            if lc.gap and lc.required]
    if gaps:
        lines.append("gaps:")
        lines += [f"  - {g}" for g in dict.fromkeys(gaps)]
    rules = [f"  - {vc.vm.name}: {'; '.join(vc.rule.missing())}"
             for vc in cov.vms.values() if not vc.rule.ok]
    if rules:
        lines += ["3-2-1-1-0 not met:", *rules]
    lines += ha_lines(cov)
    lines.append(f"N+1 hosts (from {cov.n1_source}):")
    for h in cov.n1:
        state = {True: "ok", False: "FAILS", None: "unknown"}[h.fits]
        lines.append(f"  - {h.host} ({len(h.vms)} VM{'' if len(h.vms) == 1 else 's'}): {state}"
                     + (f": {h.problem}" if h.problem else ""))
    tp = ", ".join(f"{r} {fmt_size(v)}/s ({how})" for r, (v, how) in cov.throughput.items())
    if tp:
        lines.append(f"restore throughput: {tp}")
    return lines
