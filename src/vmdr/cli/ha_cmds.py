"""``vmdr ha validate | simulate``: the HA policy of the inventory, and what a host failure
would do."""

from __future__ import annotations

import argparse
from typing import Any

from vmdr.agent.ha_restore import preview_line
from vmdr.cli import ha_engine_cmds, ha_ops_cmds
from vmdr.cli.common import Globals, emit_json, out, warn
from vmdr.errors import UsageError
from vmdr.ha import admission
from vmdr.ha.failover import FailoverPlan, failover_plan
from vmdr.ha.model import ClusterState, HAPolicy, load_policy, state_from_inventory
from vmdr.ha.noshared import with_replica_affinity
from vmdr.plan import inventory
from vmdr.plan.units import fmt_size


def _load(g: Globals) -> tuple[inventory.Inventory, HAPolicy]:
    inv = inventory.from_config(g.config)
    policy = load_policy(inv)
    for w in inv.warnings:
        warn(w)
    return inv, policy


def _hosts(inv: inventory.Inventory, value: str | None, option: str) -> set[str]:
    names = {h.strip() for h in (value or "").split(",") if h.strip()}
    for h in sorted(names):
        if h not in inv.hosts:
            known = ", ".join(sorted(inv.hosts)) or "none declared in [hosts]"
            raise UsageError(f"{option}: unknown host {h!r} (known: {known})")
    return names


def _warnings(inv: inventory.Inventory, policy: HAPolicy, state: ClusterState) -> list[str]:
    out_: list[str] = []
    for name in sorted(policy.vms):
        vm = inv.vms[name]
        if vm.host is None:
            out_.append(f"{name}: under HA but on no host (set vm.{name}.host)")
        if not state.vms[name].size_known:
            out_.append(f"{name}: size unknown (set vm.{name}.vcpus and memory); admission "
                        "control counts it as empty")
        for dep in vm.depends_on:
            if dep not in policy.vms:
                out_.append(f"{name}: depends on {dep}, which is not under HA")
    seen: dict[tuple[str, str], str] = {}
    for name, group in sorted(policy.groups.items()):
        host = inv.vms[name].host
        if host is None:
            continue
        unit = policy.unit(group, host)
        other = seen.get((group, unit))
        if other:
            out_.append(f"{name}: shares {policy.settings.scope(group)} {unit} with {other} "
                        f"(anti-affinity group {group!r})")
        seen[(group, unit)] = name
    for h in sorted(inv.hosts.values(), key=lambda h: h.name):
        if h.vcpus is None or h.memory is None:
            out_.append(f"host {h.name}: capacity unknown (set hosts.{h.name}.vcpus and "
                        "memory); never a failover target")
    return out_


def _admission_json(a: admission.Admission) -> dict[str, Any]:
    return {"host_failures_tolerated": a.required, "ok": a.ok, "scenarios": a.scenarios,
            "exhaustive": a.exhaustive,
            "worst_spare_memory": a.worst.spare_memory if a.worst else None,
            "worst_failure": list(a.worst.failed) if a.worst else None,
            "problems": a.problems()}


def _live_state(inv: inventory.Inventory, g: Globals) -> tuple[ClusterState, str]:
    """The cluster from the agents in etcd when it answers, else as the inventory says."""
    from vmdr.cli.ha_ops_cmds import open_records
    from vmdr.ha.fleet import state_from_members
    try:
        records = open_records(g.config)
        if records is not None:
            state, _notes = state_from_members(inv, records)
            up = sum(1 for h in state.hosts.values() if h.up)
            if up:
                return state, f"live data: etcd ({up} live agent{'s' if up != 1 else ''})"
            why = "etcd answers but no agent is live"
        else:
            why = "no [agent] etcd configured"
    except Exception as exc:  # etcd down: the inventory's figures, saying so
        why = f"etcd not reachable: {str(exc) or type(exc).__name__}"
    return state_from_inventory(inv), f"inventory figures ({why})"


def cmd_validate(ns: argparse.Namespace, g: Globals) -> int:
    from vmdr.agent.ha_runtime import check_repositories

    inv, policy = _load(g)
    check_repositories(g.config, policy, inv)
    state, source = _live_state(inv, g)
    adm, per_vm = admission.per_vm(policy, state)
    s = policy.settings
    warnings = _warnings(inv, policy, state)
    refused = not adm.ok and s.admission == "refuse"
    if g.json:
        emit_json({
            "ok": not refused, "ha_vms": sorted(policy.vms), "source": source,
            "refused" if s.admission == "refuse" else "warned": per_vm,
            "settings": {"lease_ttl_s": s.lease_ttl, "lease_renew_s": s.lease_renew,
                         "self_fence_after_s": s.self_fence_after,
                         "fence_delay_s": s.fence_delay,
                         "worst_restart_decision_s": s.worst_restart_after_crash,
                         "fence_command": bool(s.fence_command),
                         "admission": s.admission},
            "admission": _admission_json(adm), "warnings": warnings})
    else:
        out(f"{len(policy.vms)} VMs under HA on {len(inv.hosts)} hosts")
        out(f"lease {s.lease_ttl:g}s, renewed every {s.lease_renew:g}s; a host that cannot "
            f"renew fences itself after {s.self_fence_after:g}s; restarts "
            f"{s.fence_delay:g}s after its lease expires (≤ {s.worst_restart_after_crash:g}s "
            "after a crash)")
        if adm.ok:
            spare = f", {fmt_size(adm.worst.spare_memory)} memory to spare in the worst " \
                    f"case ({', '.join(adm.worst.failed)})" if adm.worst and adm.worst.failed \
                else ""
            out(f"admission: ok, any {adm.required} host failure(s) tolerated{spare}"
                + ("" if adm.exhaustive else f" (heaviest {adm.scenarios} combinations)"))
        else:
            out(f"admission: cannot absorb {adm.required} host failure(s)"
                f"{' (refused)' if refused else ' (warning only)'}:")
            for p in adm.problems():
                out(f"  {p}")
            verb = "refused" if refused else "would break it (warning)"
            for vm, why in sorted(per_vm.items()):
                out(f"  HA {verb} for {vm}: {why}")
        out(f"  (from {source})")
        for w in warnings:
            warn(w)
    return 1 if refused else 0


def _print_plan(plan: FailoverPlan) -> None:
    out(f"if {', '.join(plan.failed)} fail{'s' if len(plan.failed) == 1 else ''}:")
    if not plan.starts and not plan.placement.unplaced:
        out("  no VM under HA runs there")
    stage = -1
    for s in plan.starts:
        if s.stage != stage:
            stage = s.stage
            out(f"  stage {s.stage + 1} (priority {s.priority}):")
        ready = s.ready.check + (f" +{s.ready.delay:g}s" if s.ready.delay else "")
        deps = [d for d in s.after if d in {x.vm for x in plan.starts if x.stage == s.stage}]
        after = f", after {', '.join(deps)}" if deps else ""
        missing = f"; {', '.join(s.missing)} not restarted (not waited for)" \
            if s.missing else ""
        out(f"    {s.vm} → {s.host}  (ready: {ready}{after}{missing})")
    if plan.placement.unplaced:
        out("  cannot be placed:")
        for vm, why in sorted(plan.placement.unplaced.items()):
            out(f"    {vm}: {why}")
    if plan.not_protected:
        out(f"  not under HA, stay down: {', '.join(plan.not_protected)}")
    for n in plan.placement.notes:
        out(f"  note: {n}")


def cmd_simulate(ns: argparse.Namespace, g: Globals) -> int:
    inv, policy = _load(g)
    failed = _hosts(inv, ns.fail, "--fail")
    if not failed:
        raise UsageError("--fail: name at least one host")
    maintenance = _hosts(inv, ns.maintenance, "--maintenance")
    lv_down = _hosts(inv, ns.libvirt_down, "--libvirt-down") | _libvirt_down_live(inv, g)
    state = state_from_inventory(inv, maintenance=maintenance, libvirt_down=lv_down)
    plan = failover_plan(with_replica_affinity(policy), state, failed)
    restores = _restores(g, inv, policy, plan)
    if g.json:
        emit_json({**plan.to_json(), "maintenance": sorted(maintenance),
                   "libvirt_down": sorted(lv_down), "restores": restores})
    else:
        if lv_down - failed:
            out(f"libvirt down on {', '.join(sorted(lv_down - failed))}: no target")
        _print_plan(plan)
        if restores:
            out("  without shared storage (restore points as of now):")
            for row in restores:
                out("  " + preview_line(row))
    return 0 if plan.ok and all(r["point"] for r in restores) else 1


def _libvirt_down_live(inv: inventory.Inventory, g: Globals) -> set[str]:
    """Hosts whose agent reports in etcd that their libvirt does not answer (alive, no
    failover target); empty without [agent] etcd or when etcd does not answer."""
    from vmdr.cli.ha_ops_cmds import open_records
    try:
        records = open_records(g.config)
        members = records.members() if records is not None else {}
    except Exception:  # etcd down: on paper only (--libvirt-down)
        return set()
    return {h for h, m in members.items() if h in inv.hosts and m.get("libvirt_ok") is False}


def _restores(g: Globals, inv: inventory.Inventory, policy: HAPolicy,
              plan: FailoverPlan) -> list[dict[str, Any]]:
    """The restore point each placed VM without shared storage would start from."""
    from vmdr.agent.ha_restore import preview
    from vmdr.timeutil import utcnow

    targets: dict[str, str | None] = {s.vm: s.host for s in plan.starts}
    targets.update(dict.fromkeys(plan.placement.unplaced))
    if not any(policy.vms[v].local for v in targets if v in policy.vms):
        return []
    return preview(g.config, inv, policy, targets, utcnow().timestamp())


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ha", parents=parents, help="high availability: validate the policy, simulate failures",
        description="High availability from the inventory: [ha] timings and admission "
                    "control, and per VM ha, boot_group (restart priority), depends_on, "
                    "anti_affinity, hosts/hosts_rule, ready_check/ready_delay, "
                    "ha_storage/ha_repository (no shared storage: restart from a replica "
                    "or backup).")
    psub = p.add_subparsers(dest="ha_command", metavar="SUBCOMMAND", required=True)
    q = psub.add_parser(
        "validate", parents=parents, help="check the HA policy and N+k admission control",
        description="Check the [ha] table and the HA keys of every VM, and whether the "
                    "cluster can restart every HA VM after any host_failures_tolerated "
                    "host failures (placement with capacity, anti-affinity and affinity).",
        epilog="exit codes: 0 valid (admission ok, or admission = \"warn\"), 1 admission "
               "control fails with admission = \"refuse\", 2 bad inventory or arguments")
    q.set_defaults(func=cmd_validate)
    q = psub.add_parser(
        "simulate", parents=parents, help="what a host failure would restart, where, in "
                                          "which order",
        description="Fail the given hosts on paper: place their HA VMs on the other hosts "
                    "and print the boot order by priority group and dependencies, the "
                    "readiness each stage waits for, and the VMs that cannot be placed with "
                    "the reason. Uses the inventory's declared hosts and sizes; hosts whose "
                    "agent reports its libvirt down (etcd) are no targets.",
        epilog="exit codes: 0 every HA VM placed (and every one without shared storage "
               "has a restore point), 1 some cannot be placed or restored, 2 bad inventory "
               "or arguments")
    q.add_argument("--fail", metavar="HOST[,HOST...]", required=True,
                   help="the hosts that fail")
    q.add_argument("--maintenance", metavar="HOST[,HOST...]",
                   help="hosts in maintenance (never failover targets)")
    q.add_argument("--libvirt-down", metavar="HOST[,HOST...]",
                   help="hosts whose libvirt does not answer (alive, their VMs run on, but "
                        "no failover target); with [agent] etcd, the hosts whose agent "
                        "reports it are added")
    q.set_defaults(func=cmd_simulate)
    ha_engine_cmds.register_engine(psub, parents)  # status, events (ha-engine)
    ha_ops_cmds.register(psub, parents)  # maintenance, test (ha-ops)
