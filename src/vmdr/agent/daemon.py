"""The agent's loop: one decision pass per second, each decision logged with its reason.

Per cycle (Patroni's ``run_cycle`` shape): renew membership and ask the coordination store
whether this agent leads; if it does, fire due schedules into queued jobs; then start the
queued jobs of this host that the limits allow. Every minute: RPO check, history retention.
Jobs run as subprocesses (vmdr.agent.runner), so nothing a job does can stop this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vmdr import config as configmod
from vmdr.agent import scheduler as sched
from vmdr.agent.alerts import Alerter
from vmdr.agent.clock import stamp, wall
from vmdr.agent.coord import Coordinator, Embedded, Member
from vmdr.agent.coord_etcd import EtcdCoordinator
from vmdr.agent.ha_runtime import HARuntime, make_ha_runtime
from vmdr.agent.history import History, Job, new_job_id
from vmdr.agent.inventory import LibvirtVMs, VMSource
from vmdr.agent.runner import Runner, job_command
from vmdr.config import Config
from vmdr.hypervisor import ssh_mux
from vmdr.timeutil import utcnow

log = logging.getLogger("vmdr.agent")
STATS_EVERY = 600.0  # seconds between repository size measurements
PROTECTION_TTL = 5.0  # seconds a computed protection table is served again, at most


def make_coordinator(cfg: Config, history: History) -> Coordinator:
    if cfg.agent.etcd:
        return EtcdCoordinator(cfg.agent.etcd, cfg.agent.lease_ttl_s, cfg.agent.etcd_prefix)
    return Embedded(history)


def scheduled_id(key: str, vm: str | None, due: float) -> str:
    """The same id for the same run of a schedule on every agent: a second leader that
    fires the same occurrence again inserts nothing."""
    h = hashlib.sha256(f"{key}\0{vm}\0{due:.3f}".encode()).hexdigest()[:8]
    return stamp(due) + "-" + h


def local_tz() -> dt.tzinfo:
    tz = utcnow().astimezone().tzinfo  # the host's zone: calendar times are local
    assert tz is not None
    return tz


class Agent:
    """Everything the daemon, the API and the dashboard share."""

    def __init__(self, cfg: Config, history: History | None = None,
                 vms: VMSource | None = None, coordinator: Coordinator | None = None,
                 clock: Callable[[], float] = wall,
                 command: Callable[[Job], list[str]] | None = None) -> None:
        self.cfg = cfg
        self.schedules = sched.schedules(cfg)  # CalendarError (exit 2) on a bad schedule
        self.host = cfg.agent.host or socket.gethostname()
        self.clock = clock
        self.history = history or History.open(cfg.agent.state, cfg.agent.database)
        self.vm_source = vms or LibvirtVMs(cfg, self.host)
        self.coord = coordinator or make_coordinator(cfg, self.history)
        self.ha: HARuntime | None = None
        if isinstance(self.coord, EtcdCoordinator):  # HA needs the fleet's etcd
            self.ha = make_ha_runtime(cfg, self.host, self.coord)
            if self.ha is not None:
                self.ha.is_leader = lambda: self.leader
        self.runner = Runner(self.history, command or (lambda j: job_command(self.cfg, j)),
                             clock)
        self.runner.listeners.append(self._job_finished)
        self.alerter = Alerter(cfg.agent.alerts, self.history, clock)
        self.started = clock()
        self.leader = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = asyncio.Event()
        self._last_minute = 0.0
        self._last_stats = 0.0
        self._state_broken = False
        self._known_state: dict[str, float] | None = None  # last schedule state seen
        self._prot: tuple[float, int, list[dict[str, Any]]] | None = None
        self._prot_lock = threading.Lock()
        self.scheduling_note: str | None = None

    # -- start-up -----------------------------------------------------------------------
    def recover(self) -> None:
        """Jobs this host left running when it died are marked interrupted."""
        ids = self.history.mark_interrupted(self.host, self.clock())
        for i in ids:
            log.warning("job %s was running when the agent stopped: marked interrupted", i)

    # -- the loop -----------------------------------------------------------------------
    async def run(self, period: float = 1.0) -> None:
        self.recover()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.vm_source.refresh)
        log.info("agent on %s: %d policies, %d VMs, history in %s, coordination %s",
                 self.host, len(self.cfg.policies), len(self.vm_source.vms()),
                 self.history.dialect, self.coord.name)
        if self.ha is not None:
            self.ha.start()
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                await self.cycle()
                if self._state_broken:
                    self._state_broken = False
                    self.alerter.resolve("state:history", "the agent's history is writable")
            except Exception as exc:
                if "full" in str(exc).lower() or "disk i/o" in str(exc).lower():
                    # SQLite refuses the write and keeps the database intact; say so once
                    self._state_broken = True
                    where = "its database" if self.cfg.agent.database else self.cfg.agent.state
                    self.alerter.fire("state:history", "state_disk",
                                      f"the agent cannot write its history ({where}): {exc}")
                else:
                    log.exception("agent cycle failed; continuing")
            # wake just after the next whole second, so a calendar time is seen as due in
            # the first cycle after it (timers may fire a little early)
            if period >= 1.0:
                delay = 1.0 - self.clock() % 1.0 + 0.02
            else:
                delay = max(0.05, period - (time.monotonic() - t0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
        await self.runner.stop_all()
        for t in list(self.tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(t, 5)
        if self.ha is not None:
            self.ha.stop()
        self.coord.close()
        # the DR hosts' ssh masters its replica cycles left up (they would end by
        # themselves after VMDR_SSH_PERSIST idle seconds)
        if any(p.kind == "replicate" for p in self.cfg.policies.values()):
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, ssh_mux.stop_masters)

    async def cycle(self) -> None:
        now = self.clock()
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, self.vm_source.refresh)
        info = self.vm_source.host_info()
        local = self.vm_source.vms()
        me = Member(self.host, self.cfg.agent.listen, info.cpus, info.memory_mib,
                    [v.name for v in local if v.running],
                    vms=[{"name": v.name, "running": v.running, "tier": v.tier}
                         for v in local])
        if self.ha is not None and self.ha.libvirt_down is not None:
            me.libvirt_ok = False
            me.libvirt_down, me.libvirt_error = self.ha.libvirt_down, self.ha.libvirt_error
        was = self.leader
        isolated = False
        try:
            self.leader = await loop.run_in_executor(None, self.coord.tick, me, now)
            self.scheduling_note = None
        except Exception as exc:
            self.leader, isolated = False, True
            own = sorted({x.policy for x in self.local_schedules()})
            self.scheduling_note = f"coordination store unreachable: {exc}"
            if own and self._known_state is not None:
                self.scheduling_note += (f"; running this host's own policies ({', '.join(own)}) "
                                         "on their last known schedule")
            log.warning("%s; not scheduling the fleet", self.scheduling_note)
        if self.leader != was:
            log.info("%s the leader", "became" if self.leader else "is no longer")
        if isolated:
            self.schedule_isolated(now)
        elif self.leader:
            self.schedule(now)
            if self.coord.name != "embedded":
                self.reassign_lost(now)
        self.dispatch(now)
        if now - self._last_minute >= 60:
            self._last_minute = now
            await loop.run_in_executor(None, self.minutely, now)

    def local_schedules(self) -> list[sched.Schedule]:
        """Schedules of policies bound to this host alone (``hosts = ["<this host>"]``)."""
        return [s for s in self.schedules if self.cfg.policies[s.policy].hosts == [self.host]]

    def schedule_isolated(self, now: float) -> list[Job]:
        """The coordination store is unreachable: this host's own policies go on from the
        last schedule state it saw (kept in memory); the fleet's wait for a leader. Their
        jobs keep their deterministic ids, so a leader that later fires the same occurrence
        queues nothing twice."""
        known = self._known_state
        if known is None:
            return []

        def advance(key: str, expected: float | None, new: float) -> bool:
            known[key] = new
            return True

        return self._fire(self.local_schedules(), dict(known), advance, now)

    def schedule(self, now: float) -> list[Job]:
        """Fire due schedules (first sight: start counting from now) and queue their jobs."""
        state = self.coord.schedule_state()
        for s in self.schedules:
            if s.key not in state:
                self.coord.advance(s.key, None, now)
                state[s.key] = now
        self._known_state = dict(state)

        def advance(key: str, expected: float | None, new: float) -> bool:
            ok = self.coord.advance(key, expected, new)
            if ok and self._known_state is not None:
                self._known_state[key] = new
            return ok

        return self._fire(self.schedules, state, advance, now)

    def _fire(self, scheds: list[sched.Schedule], state: dict[str, float],
              advance: Callable[[str, float | None, float], bool], now: float) -> list[Job]:
        created: list[Job] = []
        when = dt.datetime.fromtimestamp(now, local_tz())
        for f in sched.due(scheds, state, when):
            if not advance(f.schedule.key, f.previous, now):
                log.info("schedule %s: already handled by another agent", f.schedule.key)
                continue
            specs = sched.expand(self.cfg, f, self.all_vms(), self.host)
            log.info("schedule %s fired for %s%s: %d job(s)", f.schedule.key,
                     dt.datetime.fromtimestamp(f.due, local_tz()).isoformat(timespec="seconds"),
                     " (catching up once for missed runs)" if f.catch_up else "", len(specs))
            for spec in specs:
                j = self.enqueue(spec.type, spec.vm, spec.repository, spec.policy, spec.host,
                                 dict(spec.args, not_before=spec.not_before), f.due, "schedule",
                                 job_id=scheduled_id(f.schedule.key, spec.vm, f.due))
                if j:
                    created.append(j)
        return created

    def all_vms(self) -> list[sched.VMInfo]:
        """Every VM the fleet's members report (fleet mode), else this host's. A VM known
        to several hosts (shared storage) belongs to the one where it runs."""
        if self.coord.name == "embedded":
            return self.vm_source.vms()
        out: dict[str, sched.VMInfo] = {}
        for m in self.coord.members():
            for v in m.vms:
                vm = sched.VMInfo(str(v["name"]), m.host, bool(v.get("running")),
                                  v.get("tier") if isinstance(v.get("tier"), str) else None)
                if vm.name not in out or (vm.running and not out[vm.name].running):
                    out[vm.name] = vm
        return sorted(out.values(), key=lambda v: v.name)

    def reassign_lost(self, now: float) -> None:
        """Jobs of hosts that left the fleet: running ones are reported interrupted, queued
        ones move to the host where their VM now is, or wait and are reported."""
        live = {m.host for m in self.coord.members()}
        where = {v.name: v.host for v in self.all_vms()}
        for j in self.history.active_jobs():
            if j.host in live:
                continue
            key = f"host:{j.host}"
            if j.state == "running":
                self.history.update_job(j.id, state="interrupted", ended=now,
                                        error=f"host {j.host} left the fleet")
                self.alerter.fire(key, "host_lost", f"host {j.host} left the fleet; job "
                                                    f"{j.id} ({j.type} {j.vm}) interrupted")
            elif j.vm and where.get(j.vm) in live:
                self.history.update_job(j.id, host=where[j.vm])
                log.info("job %s: host %s is gone, %s now on %s: job moved", j.id, j.host,
                         j.vm, where[j.vm])
            else:
                self.alerter.fire(key, "host_lost", f"host {j.host} left the fleet; job "
                                                    f"{j.id} waits for it")

    def enqueue(self, type_: str, vm: str | None, repository: str, policy: str | None,
                host: str | None, args: dict[str, Any], scheduled_for: float | None,
                requested_by: str, job_id: str | None = None) -> Job | None:
        """Queue a job, unless the same kind is already queued for that VM (coalesced)."""
        if vm is not None:
            for j in self.history.active_jobs():
                if j.vm == vm and j.type == type_ and j.state == "queued":
                    log.info("%s of %s already queued as %s; not queueing another", type_, vm,
                             j.id)
                    return None
        now = self.clock()
        args.setdefault("not_before", now)
        job = Job(id=job_id or new_job_id(), type=type_, vm=vm, state="queued", created=now,
                  policy=policy, repository=repository, host=host or self.host,
                  scheduled_for=scheduled_for, requested_by=requested_by, args=args)
        if not self.history.add_job(job):
            log.info("job %s already queued (by an earlier leader); not again", job.id)
            return None
        return job

    def dispatch(self, now: float) -> list[Job]:
        active = self.history.active_jobs(self.host)
        running = [j for j in active if j.state == "running"]
        queued = [j for j in active if j.state == "queued"]
        go = sched.startable(queued, running, now, self.cfg.agent.max_jobs,
                             self.cfg.agent.repository_jobs, self.cfg.agent.max_mirrors)
        for j in go:
            t = asyncio.get_running_loop().create_task(self.runner.run(j))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        return go

    def _job_finished(self, job: Job) -> None:
        key = f"job:{job.type}:{job.vm or job.repository}"
        if job.state == "ok":
            self.alerter.resolve(key, f"{job.type} of {job.vm or job.repository} succeeded")
            if job.type == "backup":
                for to in job.args.get("copy", []) or []:
                    self.enqueue("copy", job.vm, str(job.repository), job.policy, job.host,
                                 {"to": to}, None, f"after {job.id}")
        else:
            kind = "verify_failed" if job.type == "verify" else "job_failed"
            self.alerter.fire(key, kind, f"{job.type} of {job.vm or job.repository} "
                                         f"{job.state}: {job.error or ''} (job {job.id})")

    # -- every minute -------------------------------------------------------------------
    def minutely(self, now: float) -> None:
        self.check_rpo(now)
        self.check_replicas()
        self.history.expire(now - self.cfg.agent.history_days * 86400)
        if now - self._last_stats >= STATS_EVERY:
            self._last_stats = now
            self.measure_repositories(now)

    def measure_repositories(self, now: float) -> None:
        """Stored bytes per repository (the growth chart, the metric), and the
        repository-unreachable alert with its resolve."""
        from vmdr.agent.views import repo_stats

        for name in sorted(self.cfg.repositories):
            st, err = repo_stats(self.cfg, name)
            key = f"repo:{name}"
            if st is None:
                self.alerter.fire(key, "repository_unreachable",
                                  f"repository {name} cannot be read: {err}")
                continue
            self.alerter.resolve(key, f"repository {name} is readable again")
            self.history.add_repo_stat(name, now, int(st.get("stored_bytes", 0)),
                                       int(st.get("snapshots", 0)))

    def protection(self, now: float | None = None) -> list[dict[str, Any]]:
        """Per VM: its policy, last backup, achieved RPO against its target, last verify.
        Shared by the API, the dashboard and /metrics: computed again when a job of this
        agent changed the history (a job ended, one was queued) or after PROTECTION_TTL
        seconds (the fleet's other agents, the inventory, the RPOs' ageing)."""
        t = self.clock() if now is None else now
        with self._prot_lock:
            cached = self._prot
            version = self.history.version
            if (now is None and cached is not None and cached[1] == version
                    and 0 <= t - cached[0] < PROTECTION_TTL):
                return cached[2]
            rows = self._protection(t)
            if now is None:
                self._prot = (t, version, rows)
            return rows

    def protection_fresh(self) -> list[dict[str, Any]] | None:
        """The shared table if it is still current, else None (never computes: safe on the
        event loop)."""
        cached = self._prot
        if (cached is not None and cached[1] == self.history.version
                and 0 <= self.clock() - cached[0] < PROTECTION_TTL):
            return cached[2]
        return None

    def _protection(self, now: float) -> list[dict[str, Any]]:
        when = dt.datetime.fromtimestamp(now, local_tz())
        backups = self.history.last_success("backup")
        verifies = self.history.last_success("verify")
        period: dict[str, float] = {}  # policy -> 2 × its schedule's period (default target)
        out = []
        for vm in self.all_vms():
            pol = sched.policy_of(self.cfg, vm)
            last = backups.get(vm.name, (None, None))[0]
            target = None
            if pol is not None:
                target = pol.rpo_s if pol.rpo_s is not None else sched.vm_rpo(self.cfg, vm)
                if target is None:
                    if pol.name not in period:
                        period[pol.name] = sched.rpo_target(self.cfg, sched.VMInfo("", ""),
                                                            pol, when)
                    target = period[pol.name]
            rpo = now - last if last else None
            out.append({
                "name": vm.name, "host": vm.host, "running": vm.running, "tier": vm.tier,
                "policy": pol.name if pol else None,
                "repository": pol.repository if pol else None,
                "last_backup": last, "rpo_s": rpo, "rpo_target_s": target,
                "rpo_ok": None if target is None else (rpo is not None and rpo <= target),
                "last_verified": verifies.get(vm.name, (None, None))[0],
            })
        return out

    def check_replicas(self) -> None:
        """Replicas and mirrors against their RPO targets (vmdr.agent.web_replicas)."""
        from vmdr.agent.web_replicas import check_replicas

        try:
            check_replicas(self)
        except Exception:
            log.exception("replica check failed; continuing")

    def check_rpo(self, now: float) -> None:
        for p in self.protection(now):
            if p["rpo_target_s"] is None:
                continue
            key = f"rpo:{p['name']}"
            age = p["rpo_s"] if p["rpo_s"] is not None else now - self.started
            if age > p["rpo_target_s"]:
                self.alerter.fire(key, "rpo_breach",
                                  f"{p['name']}: achieved RPO {age / 3600:.1f} h is past its "
                                  f"target {p['rpo_target_s'] / 3600:.1f} h")
            else:
                self.alerter.resolve(key, f"{p['name']}: RPO back within target")

    # -- reload -------------------------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP: re-read the config; on any error keep the old one and say why."""
        try:
            cfg = configmod.load(self.cfg.path)
            schedules = sched.schedules(cfg)
        except Exception as exc:
            log.error("reload failed, keeping the old config: %s", exc)
            return False
        self.cfg, self.schedules = cfg, schedules
        self.alerter.cfg = cfg.agent.alerts
        log.info("config reloaded: %d policies", len(cfg.policies))
        return True

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, self.stopping.set)
