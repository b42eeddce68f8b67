"""The VM watchdog's escalation: once a VM's restart budget on its host is spent
(``on_budget_exhausted = "failover"``), restart it on another host by the placement rules.

:class:`Escalator` is the ``escalate`` callback of :class:`vmdr.ha.monitor.Monitor` (the
monitor has already saved the screenshot evidence and recorded ``escalated``). It places
the VM on the other hosts (capacity, anti-affinity, host affinity; hosts in maintenance
never), then, in this order so that the VM can never run twice: powers it off here and
undefines it here, defines it on the target and starts it. If no host fits, or the target
refuses to start it, the definition goes back to this host (stopped) and the callback
returns False: the monitor raises its alert.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from vmdr.errors import HypervisorError
from vmdr.plan.inventory import Inventory

from .fleet import Connect, all_rules, live_state
from .model import ClusterState, HAPolicy
from .monitor import WatchdogEvent
from .placement import place
from .records import HARecords

__all__ = ["Escalator"]

log = logging.getLogger(__name__)


class Escalator:
    """``escalate(vm, event) -> bool`` for the watchdog of host ``host``."""

    def __init__(self, inv: Inventory, policy: HAPolicy, connect: Connect, host: str,
                 records: HARecords | None = None) -> None:
        self.inv, self.policy, self.connect, self.host = inv, policy, connect, host
        self.records = records
        self.last: dict[str, str] = {}  # vm -> what happened (for tests and the log)

    def _event(self, kind: str, reason: str, vm: str, host: str | None,
               **detail: object) -> None:
        self.last[vm] = f"{kind}: {reason}"
        log.info("watchdog escalation: %s: %s", kind, reason)
        if self.records is not None:
            try:
                self.records.event(kind, reason, host=host, vm=vm, detail=dict(detail))
            except Exception as exc:  # etcd down must not stop the restart
                log.warning("could not record the HA event: %s", exc)

    def target(self, vm: str) -> tuple[str | None, str]:
        """Where ``vm`` would go (None and why if nowhere)."""
        live = live_state(self.inv, self.connect, self.records)
        rules = all_rules(self.inv, self.policy, [vm])
        st = live.state
        hosts = dict(st.hosts)
        if self.host in hosts:  # never back onto the host whose budget is spent
            hosts[self.host] = replace(hosts[self.host], maintenance=True)
        vms = dict(st.vms)
        if vm in vms:
            vms[vm] = replace(vms[vm], running=False)
        p = place(rules, ClusterState(hosts, vms), [vm])
        if vm in p.placed:
            return p.placed[vm], ""
        return None, p.unplaced.get(vm, "no host fits")

    def __call__(self, vm: str, ev: WatchdogEvent) -> bool:
        target, why = self.target(vm)
        if target is None:
            self._event("gave-up", f"{vm}: restart budget spent on {self.host}, and no other "
                                   f"host can take it: {why}", vm, self.host)
            return False
        self._event("placed", f"{vm}: restart budget spent on {self.host} ({ev.reason}); "
                              f"restarting on {target}", vm, target, source=self.host)
        src = self.connect(self.host)
        try:
            dom = src.lookup(vm)
            xml = dom.xml(inactive=True)
            dom.destroy()
            src.lookup(vm).undefine()  # so it cannot start here again
            try:
                dst = self.connect(target)
                try:
                    dst.define(xml)
                    dst.lookup(vm).start()
                finally:
                    dst.close()
            except HypervisorError as exc:
                src.define(xml)  # back where it was, stopped: the alert says why
                self._event("gave-up", f"{vm}: starting it on {target} failed "
                                       f"({exc.message}); defined again on {self.host}, "
                                       "stopped", vm, target, source=self.host)
                return False
        finally:
            src.close()
        self._event("started", f"{vm} restarted on {target} by its watchdog (restart "
                               f"budget spent on {self.host})", vm, target, source=self.host)
        return True
