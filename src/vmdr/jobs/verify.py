"""``vmdr verify``: prove a snapshot is intact, and optionally that it boots.

* Data (always): the snapshot's chunks are fetched, authenticated, decompressed and
  re-hashed (``check --read-data`` restricted to it); a missing or corrupt chunk fails
  the check and names the damaged snapshot and disk. With ``--boot`` only presence is
  checked up front — booting reads what the guest needs.
* Boot (``--boot``): the disks are served over NBD (:mod:`vmdr.serve`), a qcow2 overlay
  takes every write, and a transient, isolated copy of the VM boots in a sandbox
  (:mod:`vmdr.serve.sandbox`). Heartbeats (guest agent, console regex), TCP ports and
  user scripts decide; a screenshot of the console is kept as evidence.

The result is attached to the snapshot (kind ``verification``); the screenshot is an
attachment of kind ``evidence`` referenced by its ID.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from vmdr.config import VMConfig
from vmdr.errors import (
    ConfigError,
    HypervisorError,
    UsageError,
    VerificationFailed,
    VmdrError,
)
from vmdr.events import JobEvents
from vmdr.hypervisor import Domain, Hypervisor
from vmdr.hypervisor.state import qemu_user
from vmdr.repository.check import check
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository
from vmdr.serve import sandbox as sb
from vmdr.serve import start_server
from vmdr.serve.checks import Check, check_ports, run_script, wait_heartbeats
from vmdr.serve.png import png_size
from vmdr.timeutil import utcnow

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")


@dataclass
class VerifyOptions:
    boot: bool = False
    timeout: float = 300.0
    agent: bool | None = None  # None: when the VM has a guest agent channel
    console: str | None = None  # regex on the serial console
    ports: list[int] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)
    network: str | None = None  # isolated libvirt network for port checks
    evidence_dir: str | None = None
    scratch_dir: str = "/var/lib/libvirt/qemu/vmdr"
    uri: str = "qemu:///system"
    record: bool = True


@dataclass
class VerifyResult:
    snapshot: Snapshot
    boot: bool
    checks: list[Check] = field(default_factory=list)
    heartbeat_s: float | None = None
    evidence: list[dict[str, Any]] = field(default_factory=list)
    domain: str | None = None
    attachment: str | None = None
    warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def status(self) -> str:
        return "failed" if any(c.status == "failed" for c in self.checks) else "passed"

    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "failed"]

    def record_doc(self) -> dict[str, Any]:
        return {"kind": "verification", "status": self.status, "boot": self.boot,
                "checks": [c.as_dict() for c in self.checks],
                "heartbeat_s": None if self.heartbeat_s is None else round(self.heartbeat_s, 3),
                "evidence": self.evidence, "domain": self.domain,
                "duration_s": round(self.duration_s, 3), "warnings": self.warnings}

    def as_dict(self) -> dict[str, Any]:
        s = self.snapshot
        return {"snapshot": s.id, "name": s.name, "short_id": s.short_id,
                "attachment": self.attachment, **self.record_doc()}


def options_for(base: VerifyOptions, vm: VMConfig, where: str = "") -> VerifyOptions:
    """Merge ``[vm.NAME] verify_*`` settings under the command-line options."""
    x = vm.extra
    pre = f"{where}verify_"

    def bad(key: str, what: str) -> ConfigError:
        return ConfigError(f"{pre}{key}: expected {what}, got {x['verify_' + key]!r}")

    o = replace(base, ports=list(base.ports), scripts=list(base.scripts))
    if "verify_agent" in x and o.agent is None:
        if not isinstance(x["verify_agent"], bool):
            raise bad("agent", "true or false")
        o.agent = x["verify_agent"]
    if o.console is None:
        c = x.get("verify_console", vm.heartbeat if vm.heartbeat != "agent" else None)
        if c is not None and not isinstance(c, str):
            raise bad("console", "a regular expression")
        o.console = c
    ports = x.get("verify_ports", [])
    if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536
                                              for p in ports):
        raise bad("ports", "a list of TCP ports")
    o.ports = list(dict.fromkeys(o.ports + ports))
    scripts = x.get("verify_script", [])
    scripts = [scripts] if isinstance(scripts, str) else scripts
    if not isinstance(scripts, list) or not all(isinstance(s, str) for s in scripts):
        raise bad("script", "a path or a list of paths")
    o.scripts = o.scripts + scripts
    net = x.get("verify_network", o.network)
    if net is not None and not isinstance(net, str):
        raise bad("network", "a libvirt network name")
    o.network = net
    if "verify_timeout" in x and base.timeout == VerifyOptions.timeout:
        t = x["verify_timeout"]
        if not isinstance(t, int | float) or isinstance(t, bool) or t <= 0:
            raise bad("timeout", "a positive number of seconds")
        o.timeout = float(t)
    if o.console:
        try:
            re.compile(o.console)
        except re.error as exc:
            raise ConfigError(f"invalid console pattern {o.console!r}: {exc}") from None
    return o


def select_snapshots(repo: Repository, refs: list[str], all_: bool, latest: bool,
                     boot: bool) -> list[Snapshot]:
    if refs and all_:
        raise UsageError("name snapshots or use --all, not both")
    if not refs and not all_:
        raise UsageError("name a snapshot (VM[@ID]) or use --all")
    if refs:
        return [repo.resolve(r) for r in refs]
    snaps = repo.list_snapshots()
    if boot:
        snaps = [s for s in snaps if s.meta.get("kind") == "vm"]
    if latest:
        last: dict[str, Snapshot] = {}
        for s in snaps:
            last[s.name] = s
        snaps = sorted(last.values(), key=lambda s: (s.time, s.id))
    return snaps


def cleanup_sandboxes(scratch_dir: str, hv: Hypervisor | None) -> list[str]:
    """Tear down sandboxes left by a killed vmdr (every verify run does this first)."""
    try:
        done = sb.cleanup_leftovers(hv, scratch_dir)
    except (OSError, VmdrError) as exc:
        log.warning("cannot clean up old verification sandboxes: %s", exc)
        return []
    for line in done:
        log.info("verify: cleaned up: %s", line)
    return done


def data_check(repo: Repository, snap: Snapshot, read_data: bool,
               events: JobEvents | None = None) -> Check:
    t0 = time.monotonic()
    progress = (events or JobEvents()).progress(f"{snap.name}@{snap.short_id}")
    res = check(repo, read_data=1.0 if read_data else 0.0, snapshot_ids=[snap.id],
                progress=progress.advance if read_data else None)
    if read_data:
        progress.finish()
    name = "data" if read_data else "chunks"
    if res.ok:
        what = f"{res.chunks_read} chunks read" if read_data else \
            f"{res.chunks_referenced} chunks present"
        return Check(name, "passed", time.monotonic() - t0, what)
    lines = [p.line() for p in res.problems]
    more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
    return Check(name, "failed", time.monotonic() - t0, "; ".join(lines[:3]) + more)


def verify_snapshot(repo: Repository, snap: Snapshot, opts: VerifyOptions,
                    hv: Hypervisor | None = None,
                    events: JobEvents | None = None) -> VerifyResult:
    """Verify one snapshot and (unless ``opts.record`` is off) attach the result."""
    ev = events or JobEvents()
    ref = f"{snap.name}@{snap.short_id}"
    t0 = time.monotonic()
    res = VerifyResult(snap, opts.boot)
    ev.phase("data", "", ref)
    res.checks.append(data_check(repo, snap, read_data=not opts.boot, events=ev))
    png: bytes | None = None
    if opts.boot:
        if snap.meta.get("kind") != "vm" or not (snap.meta.get("config") or {}).get(
                "domain_xml"):
            raise UsageError(f"{snap.name}@{snap.short_id} is not a VM snapshot: nothing "
                             "to boot (verify it without --boot)")
        if hv is None:
            raise UsageError("--boot needs a libvirt connection")
        if res.checks[-1].status == "failed":
            res.checks.append(Check("boot", "skipped", None, "chunks are missing"))
        else:
            ev.phase("boot", f"{ref}: booting it in a sandbox", ref)
            png = _boot(repo, snap, opts, hv, res)
    res.duration_s = time.monotonic() - t0
    if png is not None:
        _keep_evidence(repo, snap, png, opts, res)
    if opts.record:
        res.attachment = repo.add_attachment(snap.id, res.record_doc())
    for w in res.warnings:
        ev.warning(w, ref)
    if res.status != "passed":
        ev.error(f"verification failed: {', '.join(res.failed_checks())}",
                 VerificationFailed.exit_code, ref)
    return res


def _boot(repo: Repository, snap: Snapshot, opts: VerifyOptions, hv: Hypervisor,
          res: VerifyResult) -> bytes | None:
    if not hv.local:
        raise UsageError(f"boot verification needs a local libvirt, not {hv.uri}")
    cleanup_sandboxes(opts.scratch_dir, hv)
    if opts.network:
        hv.isolated_network(opts.network)  # before any work: UsageError if it forwards
    name = _SAFE.sub("-", f"{sb.NAME_PREFIX}{snap.name}-{snap.short_id}")[:60]
    user = qemu_user() if hv.system else None
    path = os.path.join(sb.verify_root(opts.scratch_dir), name)
    if os.path.exists(path):
        raise UsageError(f"{snap.name}@{snap.short_id} is being verified by another vmdr "
                         f"({path} exists)")
    os.makedirs(opts.scratch_dir, mode=0o711, exist_ok=True)
    sandbox = sb.make_sandbox(opts.scratch_dir, name, user)
    st = sb.SandboxState(name, "")
    sb.write_state(sandbox, st)
    res.domain = name
    server = None
    png: bytes | None = None
    try:
        server = start_server(repo, snap, socket_dir=os.path.join(sandbox, "sock"),
                              socket_owner=user)
        st.nbd_pids = list(server.pids.values())
        st.private_dir = server.private_dir
        sb.write_state(sandbox, st)
        overlays = {}
        for d in snap.disks:
            ov = os.path.join(sandbox, f"{d.name}.qcow2")
            sb.create_overlay(ov, server.exports[d.name], d.size, user)
            overlays[d.name] = (ov, server.sockets[d.name])
        cfg = snap.meta["config"]
        nvram = None
        if cfg.get("nvram"):
            nvram = os.path.join(sandbox, "nvram.fd")
            with open(nvram, "wb") as f:
                f.write(base64.b64decode(cfg["nvram"]))
            sb.give_to(nvram, user)
        console = os.path.join(sandbox, "console.log")
        xml = sb.sandbox_xml(cfg["domain_xml"], name=name, overlays=overlays,
                             console_log=console, network=opts.network, nvram_path=nvram,
                             sandbox=sandbox)
        agent = opts.agent if opts.agent is not None else sb.has_agent_channel(xml)
        t0 = time.monotonic()
        deadline = t0 + opts.timeout
        try:
            dom = hv.start_sandbox(xml, network=opts.network).domain
        except HypervisorError as exc:
            res.checks.append(Check("start", "failed", time.monotonic() - t0, exc.message))
            return None
        st.uuid = dom.uuid
        sb.write_state(sandbox, st)
        res.checks.append(Check("start", "passed", time.monotonic() - t0))
        beats = wait_heartbeats(dom, t0=t0, deadline=deadline, agent_ping=agent,
                                console_pattern=opts.console, console_log=console)
        if not beats:
            beats = [_still_running(dom, t0, min(opts.timeout, 20.0))]
        res.checks += beats
        ok = [c.seconds for c in beats if c.status == "passed" and c.name != "running"]
        res.heartbeat_s = min(s for s in ok if s is not None) if ok else None
        alive = all(c.status == "passed" for c in beats)
        res.checks += check_ports(dom, opts.ports, t0=t0, deadline=deadline,
                                  has_network=opts.network is not None)
        for script in opts.scripts:
            if not alive:
                res.checks.append(Check(f"script:{os.path.basename(script)}", "skipped",
                                        None, "the guest showed no heartbeat"))
                continue
            env = {"VMDR_VERIFY_DOMAIN": name, "VMDR_VERIFY_CONSOLE": console,
                   "VMDR_SNAPSHOT": snap.id, "VMDR_VERIFY_URI": hv.uri,
                   "VMDR_VERIFY_SANDBOX": sandbox}
            res.checks.append(run_script(script, env, max(10.0, deadline - time.monotonic()),
                                         t0))
        try:
            if dom.is_active():
                png = sb.screenshot_png(dom)
        except VmdrError as exc:
            res.warnings.append(f"no screenshot: {exc.message}")
    finally:
        sb.destroy_domain(hv, st)  # first: nbdkit waits for its client to go
        if server is not None:
            server.stop()
        sb.teardown(hv, st, sandbox)
    return png


def _still_running(dom: Domain, t0: float, wait: float) -> Check:
    time.sleep(max(0.0, t0 + wait - time.monotonic()))
    ok = dom.is_active()
    return Check("running", "passed" if ok else "failed", time.monotonic() - t0,
                 "no guest agent or console pattern configured: only checked that the "
                 f"domain kept running for {wait:.0f}s")


def _keep_evidence(repo: Repository, snap: Snapshot, png: bytes, opts: VerifyOptions,
                   res: VerifyResult) -> None:
    w, h = png_size(png)
    ev: dict[str, Any] = {"type": "screenshot", "mime": "image/png", "width": w,
                          "height": h, "bytes": len(png), "path": None, "attachment": None}
    if opts.evidence_dir:
        os.makedirs(opts.evidence_dir, exist_ok=True)
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        path = os.path.join(opts.evidence_dir, f"{snap.name}-{snap.short_id}-{stamp}.png")
        with open(path, "wb") as f:
            f.write(png)
        ev["path"] = os.path.abspath(path)
    if opts.record:
        ev["attachment"] = repo.add_attachment(snap.id, {
            "kind": "evidence", "type": "screenshot", "mime": "image/png", "width": w,
            "height": h, "data": base64.b64encode(png).decode("ascii")})
    res.evidence.append(ev)
