"""A host failure, decided: what restarts where and in which order (``vmdr ha simulate``
shows it; the agent's leader executes it), and the fencing timeline.

Pure functions of (policy, cluster state, now).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmdr.ha.boot import Start, boot_plan
from vmdr.ha.model import ClusterState, HAPolicy
from vmdr.ha.placement import Placement, place
from vmdr.ha.settings import HASettings

__all__ = ["FailoverPlan", "failover_plan", "must_self_fence", "restart_allowed"]


@dataclass
class FailoverPlan:
    failed: tuple[str, ...]
    placement: Placement
    starts: list[Start]
    not_protected: list[str] = field(default_factory=list)  # VMs on failed hosts without HA

    @property
    def ok(self) -> bool:
        return not self.placement.unplaced

    def to_json(self) -> dict[str, Any]:
        return {
            "failed": list(self.failed),
            "ok": self.ok,
            "starts": [{"vm": s.vm, "host": s.host, "priority": s.priority, "stage": s.stage,
                        "after": list(s.after), "missing_dependencies": list(s.missing),
                        "ready": {"check": s.ready.check, "delay_s": s.ready.delay,
                                  "timeout_s": s.ready.timeout}} for s in self.starts],
            "unplaced": [{"vm": vm, "reason": why}
                         for vm, why in sorted(self.placement.unplaced.items())],
            "not_protected": self.not_protected,
            "notes": self.placement.notes,
        }


def failover_plan(policy: HAPolicy, state: ClusterState, failed: set[str]) -> FailoverPlan:
    """Restart the HA VMs that ran on ``failed`` hosts on the others."""
    victims = sorted(v.name for v in state.vms.values() if v.running and v.host in failed)
    after = state.fail(failed)
    ha = [v for v in victims if v in policy.vms]
    placement = place(policy, after, ha)
    starts = boot_plan(policy, after, placement.placed)
    return FailoverPlan(tuple(sorted(failed)), placement, starts,
                        [v for v in victims if v not in policy.vms])


def must_self_fence(s: HASettings, last_renew_sent: float, now: float) -> bool:
    """Whether a host whose last successful lease renewal was *sent* at
    ``last_renew_sent`` must now destroy its HA VMs (see the timing argument in
    :mod:`vmdr.ha.settings`)."""
    return now >= last_renew_sent + s.self_fence_after


def restart_allowed(s: HASettings, lease_expired_at: float, now: float) -> bool:
    """Whether the leader may restart the VMs of a host whose lease expired at
    ``lease_expired_at``: only after the fence delay."""
    return now >= lease_expired_at + s.fence_delay
