"""The DR host's side of a continuous mirror: the standby disks served over NBD by
``qemu-storage-daemon``, restore points taken in it, and the authenticated path to it.

**Export.** A small Python wrapper runs at the DR host (over the replica's ssh control
master, or here for a local target). It starts ``qemu-storage-daemon`` with one writable
NBD export per standby disk (export name = the disk's target, ``vdb``) on a unix socket in
a fresh 0700 directory, and a QMP socket beside it. It prints ``ready <socket>`` and then
reads commands on its stdin: ``snap TAG`` takes a qcow2 internal snapshot of every disk
while the export keeps serving (``blockdev-snapshot-internal-sync``: this is how the
mirror's restore points are made), ``drop TAG`` deletes one. When its stdin closes (vmdr
stopped, or the ssh session died) it quits the daemon and removes the directory. The DR
host needs ``qemu-storage-daemon`` (Debian: qemu-system-common) and ``python3``.

**Authentication: an ssh tunnel, not TLS-PSK.** The source QEMU connects to a unix socket
*on the source host* that a dedicated ``ssh -N -L`` forwards to the export's socket. The
socket lives in ``/run/vmdr/mirror-<id>/`` (0750, group of QEMU's account) with mode
0660: root and QEMU reach it, nobody else. The export never listens on TCP. The tunnel
runs with ``ServerAliveInterval=1``, ``ServerAliveCountMax=3``: a partitioned DR host is
noticed in about 3-4 s, the tunnel exits, QEMU's NBD client sees the socket close and
fails the outstanding writes at once, so the mirror job ends instead of hanging.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import subprocess
import time
from typing import Any

from vmdr.errors import HypervisorError
from vmdr.hypervisor.remote import _pdeathsig_prefix, private_base
from vmdr.jobs.replicate_site import Site, _last_line, end_session, read_line

KEEPALIVE_S = 1
KEEPALIVE_COUNT = 3

_WRAPPER = r'''
import json, os, shutil, socket, subprocess, sys, tempfile, time
group = sys.argv[1]
writethrough = sys.argv[2] == "writethrough"  # sync mirror: on the DR disk before the ack
pairs = [a.split("=", 1) for a in sys.argv[3:]]
d = tempfile.mkdtemp(prefix="vmdr-mir.", dir=os.environ.get("TMPDIR", "/tmp"))
nbd, qmp = d + "/nbd.sock", d + "/qmp.sock"
args = ["qemu-storage-daemon",
        "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp, "--monitor", "chardev=m",
        "--nbd-server", json.dumps({"addr": {"type": "unix", "path": nbd}})]
for i, (name, path) in enumerate(pairs):
    args += ["--blockdev", json.dumps({"driver": "qcow2", "node-name": name, "file": {
        "driver": "file", "filename": path, "aio": "threads"}})]
    args += ["--export", json.dumps({"type": "nbd", "id": "e%d" % i, "node-name": name,
                                     "name": name, "writable": True,
                                     "writethrough": writethrough})]
pidfile = os.path.dirname(pairs[0][1]) + "/mirror-daemon.pid"
try:  # a daemon an earlier, cut-off mirror left serving these disks
    old = int(open(pidfile).read().split()[0])
    if b"qemu-storage-daemon" in open("/proc/%d/cmdline" % old, "rb").read():
        os.kill(old, 15)
        for _ in range(100):
            if not os.path.exists("/proc/%d" % old):
                break
            time.sleep(0.1)
except (OSError, ValueError, IndexError):
    pass
err = open(d + "/err", "wb")
p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
with open(pidfile, "w") as pf:
    pf.write("%d\n" % p.pid)
def bye(code):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(d, ignore_errors=True)
    sys.exit(code)
t0 = time.monotonic()
while not (os.path.exists(nbd) and os.path.exists(qmp)):
    if p.poll() is not None or time.monotonic() - t0 > 60:
        sys.stderr.write(open(d + "/err", errors="replace").read() or "qsd failed\n")
        bye(4)
    time.sleep(0.05)
if group:
    import grp
    gid = grp.getgrnam(group).gr_gid
    os.chown(d, -1, gid); os.chmod(d, 0o750); os.chown(nbd, -1, gid); os.chmod(nbd, 0o660)
s = socket.socket(socket.AF_UNIX)
s.connect(qmp)
f = s.makefile("rw")
f.readline()
def call(cmd, **a):
    f.write(json.dumps({"execute": cmd, "arguments": a}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r:
            return None
        if "error" in r:
            return r["error"].get("desc", "error")
call("qmp_capabilities")
sys.stdout.write("ready %s\n" % nbd); sys.stdout.flush()
for line in sys.stdin:
    w = line.split()
    if len(w) != 2 or w[0] not in ("snap", "drop"):
        print("err bad command", flush=True); continue
    op = ("blockdev-snapshot-internal-sync" if w[0] == "snap"
          else "blockdev-snapshot-delete-internal-sync")
    errs = [e for e in (call(op, device=n, name=w[1]) for n, _ in pairs) if e]
    print(("err " + "; ".join(errs)) if errs else "ok", flush=True)
call("quit")
try:
    p.wait(20)
except subprocess.TimeoutExpired:
    pass
bye(0)
'''
_RUN_WRAPPER = 'c=$1; shift; exec python3 -c "$c" "$@"'


def qemu_group() -> str:
    """The group QEMU runs as under qemu:///system (Debian libvirt-qemu, Fedora qemu)."""
    for name in ("libvirt-qemu", "qemu"):
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            return name
    return ""




class MirrorExport:
    """The standby disks served for a mirror at the DR host (see the module docstring)."""

    def __init__(self, site: Site, disks: dict[str, str], *, writethrough: bool = False) -> None:
        """``writethrough``: each write is flushed to the DR host's disk before the export
        acknowledges it (the synchronous mirror's RPO 0 then survives the DR host losing
        power; QEMU's mirror does not pass the guest's flushes on to the target)."""
        self.site, self.disks, self.writethrough = site, disks, writethrough
        self.proc: subprocess.Popen[bytes] | None = None
        self.remote_socket = ""

    def open(self) -> MirrorExport:
        group = qemu_group() if self.site.local else ""
        args = (_WRAPPER, group, "writethrough" if self.writethrough else "-",
                *[f"{t}={p}" for t, p in sorted(self.disks.items())])
        argv = self.site._argv(_RUN_WRAPPER, args)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        line = read_line(self.proc, 90)
        if not line or not line.startswith("ready "):
            err = self._end()
            raise HypervisorError(f"cannot serve the standby disks on {self.site.where} for "
                                  f"the mirror: {_last_line(err)}")
        self.remote_socket = line[len("ready "):]
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, line: str, timeout: float = 30) -> None:
        """``snap TAG`` / ``drop TAG`` on every disk; HypervisorError if it fails."""
        p = self.proc
        if p is None or p.stdin is None or p.poll() is not None:
            raise HypervisorError(f"the mirror export on {self.site.where} is gone")
        try:
            p.stdin.write(line.encode() + b"\n")
            p.stdin.flush()
        except OSError as exc:
            raise HypervisorError(f"the mirror export on {self.site.where} is gone ({exc})") \
                from None
        reply = read_line(p, timeout)
        if reply != "ok":
            raise HypervisorError(f"{line.split()[0]} on {self.site.where}: "
                                  f"{reply or 'no answer'}")

    def _end(self) -> bytes:
        p, self.proc = self.proc, None
        return b"" if p is None else end_session(p, 30)

    def close(self) -> None:
        self._end()

    def abandon(self) -> None:
        """Drop the export without waiting for the DR host (it is unreachable): kill the
        local end. The daemon there lingers until its ssh session times out; the next
        export of the same disks stops it first (its pid file beside the disks)."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
        self._end()

    def __enter__(self) -> MirrorExport:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tunnel:
    """The path from the source QEMU to the export: the export's own socket for a local
    target, else a dedicated ``ssh -N -L`` into ``/run/vmdr/mirror-<id>/nbd.sock``."""

    def __init__(self, site: Site, remote_socket: str, ident: str) -> None:
        self.site, self.remote_socket, self.ident = site, remote_socket, ident
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = ""
        self.socket = remote_socket

    def open(self) -> Tunnel:
        host = self.site._host
        if host is None:
            return self
        self.dir = os.path.join(private_base(), f"mirror-{self.ident}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, mode=0o700)
        group = qemu_group()
        if group:
            os.chown(self.dir, -1, grp.getgrnam(group).gr_gid)
            os.chmod(self.dir, 0o750)  # noqa: S103 - QEMU's group reaches the socket
        self.socket = os.path.join(self.dir, "nbd.sock")
        argv = [*_pdeathsig_prefix(), *host.target.argv()]
        at = argv.index(host.target.command) + 1
        argv[at:at] = ["-o", f"ServerAliveInterval={KEEPALIVE_S}",
                     "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}"]
        argv[-2:-2] = ["-N", "-o", "ExitOnForwardFailure=yes", "-o",
                       "StreamLocalBindUnlink=yes", "-o", "StreamLocalBindMask=0117",
                       "-L", f"{self.socket}:{self.remote_socket}"]
        log = open(os.path.join(self.dir, "ssh.log"), "wb")  # noqa: SIM115 - kept open
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 45
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = _last_line(self._log())
                self.close()
                raise HypervisorError(f"the ssh tunnel to {self.site.where} failed: {why}")
            time.sleep(0.05)
        if group:
            os.chown(self.socket, -1, grp.getgrnam(group).gr_gid)
        return self

    def _log(self) -> bytes:
        try:
            with open(os.path.join(self.dir, "ssh.log"), "rb") as f:
                return f.read()
        except OSError:
            return b""

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def cut(self) -> None:
        """End the tunnel now (QEMU's outstanding NBD writes fail at once)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.cut()
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Tunnel:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()
