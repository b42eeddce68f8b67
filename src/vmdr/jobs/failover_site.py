"""The DR site's side of a failover: connections, the replica of each VM of a plan, the
test bubble (an isolated network with no uplink), throw-away overlays, restore points.

A **test failover** reads a frozen restore point, never the standby disks' live content,
so replica cycles go on writing the standby while the test runs:

* per disk, ``qemu-nbd`` serves the chosen point (the qcow2 internal snapshot, ``-l``)
  read-only with ``force-share=on`` on a unix socket ``<replica dir>/test-<run>/<disk>.sock``
  (QEMU's image locks then let a cycle's writer open the disk beside it). Only QEMU may
  connect: the socket is 0660 with the group QEMU runs as at the DR host (libvirt's DAC
  base label from the host's capabilities), or 0600 when QEMU runs as the serving user;
* the throw-away overlay ``test-<run>/<disk>.qcow2`` has that export as its backing
  (``<backingStore type='network'>`` in the test copy's XML);
* the reader holds a shared ``flock`` on ``test-<run>/pin`` (which names the point) for as
  long as it runs; a cycle never deletes a pinned point when it rotates
  (:meth:`vmdr.jobs.replicate_site.Site.pinned_points`). A snapshot's clusters are
  immutable while the snapshot exists (qcow2 copies on write whatever a snapshot still
  references), so the cycle's writes, new points and deletions of other points do not
  change one byte of what the test copy reads (tests/integration/test_testfailover_reader.py
  proves it with a real writer).

The readers run as children of vmdr's own channel to the DR host (``cat`` on their stdin),
so they stop, and their pin goes, when vmdr stops, also when it is killed. The test copy
is a *transient* domain ``vmdrt-<plan>-<vm>``, auto-destroyed when vmdr's connection
closes, so a killed vmdr leaves no running test VM; the next test removes leftover
``test-*`` directories whose pin nobody holds, and ``vmdrt-*`` networks of the plan.
"""
from __future__ import annotations

import contextlib
import hashlib
import shlex
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime

from vmdr.errors import DomainNotFound, HypervisorError, NetworkNotFound, UsageError, VmdrError
from vmdr.hypervisor import (
    Domain,
    Hypervisor,
    connect,
    interface_networks,
    map_networks,
    parse_xml,
    rewrite_domain_xml,
)
from vmdr.hypervisor.console import relocate_console_logs
from vmdr.jobs import replica_guard
from vmdr.jobs.replicate import load_state, redact_uri
from vmdr.jobs.replicate_site import Site, read_line
from vmdr.jobs.replicate_state import ReplicaState, RestorePoint
from vmdr.plan.recovery import PlanVM, RecoveryPlan

_READER = r"""d=$1 t=$2 img=$3 point=$4 size=$5 quid=$6 qgid=$7
sock=$d/$t.sock
[ -e "$img" ] || { echo "standby disk $img is missing" >&2; exit 3; }
mkdir -p -m 0755 -- "$d" || exit 3
printf '%s\n' "$point" > "$d/pin"
exec 9>>"$d/pin"
flock -s 9 || exit 3
rm -f -- "$sock"
(umask 077  # the socket is born 0700: nobody else connects before the chmod below
 exec qemu-nbd --read-only --persistent --shared=8 --load-snapshot="snapshot.name=$point" \
  --image-opts --socket="$sock" \
  "driver=qcow2,read-only=on,force-share=on,file.driver=file,file.filename=$img" \
  2>"$d/$t.err") &
p=$!
n=0
while [ ! -S "$sock" ]; do
  if ! kill -0 "$p" 2>/dev/null; then cat "$d/$t.err" >&2; exit 4; fi
  n=$((n + 1)); [ "$n" -lt 600 ] || { kill "$p"; exit 5; }
  sleep 0.05
done
# only QEMU may read the restore point: 0600 when it runs as this user (a session, or
# qemu.conf user = "root" with vmdr as root), else 0660 with QEMU's group
if [ -n "$qgid" ] && [ "$quid" != "$(id -u)" ]; then
  if ! chgrp -- "$qgid" "$sock" 2>"$d/$t.create"; then
    kill "$p" 2>/dev/null; wait "$p"
    echo "cannot give the export to QEMU's group (gid $qgid): $(cat "$d/$t.create")" >&2
    exit 4
  fi
  chmod 0660 -- "$sock"
else
  chmod 0600 -- "$sock"
fi
# creating the overlay reads the export: it serves the point (else: why qemu-nbd stopped)
if ! qemu-img create -q -f qcow2 -F raw -b "nbd+unix:///?socket=$sock" -- "$d/$t.qcow2" \
    "$5" 2>"$d/$t.create"; then
  kill "$p" 2>/dev/null; wait "$p"
  cat "$d/$t.err" "$d/$t.create" >&2; exit 4
fi
chmod 0644 -- "$d/$t.qcow2"
echo "ready $sock"
cat >/dev/null
kill "$p" 2>/dev/null
wait "$p"
rm -f -- "$sock"
"""
_LEFTOVERS = r"""for d in "$1"/test-*; do
  [ -d "$d" ] || continue
  if [ -e "$d/pin" ] && ! flock -n -x "$d/pin" true 2>/dev/null; then continue; fi
  rm -rf -- "$d" && echo "$d"
done
exit 0
"""
_REVERT = r"""img=$1 tag=$2
qemu-img snapshot -a "$tag" -- "$img"
"""
_TCP = r"""if command -v bash >/dev/null 2>&1; then
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' bash "$1" "$2" 2>/dev/null; exit $?
elif command -v nc >/dev/null 2>&1; then
  nc -z -w 3 "$1" "$2" 2>/dev/null; exit $?
fi
exit 127
"""


def test_name(plan: str, vm: str) -> str:
    return f"vmdrt-{plan}-{vm}"[:64]


def bubble_name(plan: str) -> str:
    """The plan's test network (and bridge: at most 15 characters)."""
    return "vmdrt" + hashlib.sha256(plan.encode()).hexdigest()[:8]


@dataclass
class DRVM:
    """One VM of a plan at the DR site: its replica and (once started) its domain."""

    pv: PlanVM
    hv: Hypervisor
    site: Site
    state: ReplicaState
    standby: Domain
    dom: Domain | None = None  # what this run started (standby or test copy)
    readers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # test: qemu-nbd
    exports: dict[str, str] = field(default_factory=dict)  # test: disk → frozen point socket
    point: str | None = None  # test: the restore point under test
    started_here: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.pv.name

    def dr_networks(self) -> list[str]:
        return interface_networks(self.standby.xml(inactive=True))

    def tcp_probe(self, addr: str, port: int) -> int:
        return self.site.run(_TCP, addr, str(port), ok=(0, 1, 2, 124, 127)).returncode


class Sites:
    """Open connections and DR sites, one per URI; closed together."""

    def __init__(self) -> None:
        self.hvs: dict[str, Hypervisor] = {}
        self.sites: dict[str, Site] = {}

    def hv(self, uri: str) -> Hypervisor:
        if uri not in self.hvs:
            self.hvs[uri] = connect(uri)
        return self.hvs[uri]

    def site(self, uri: str) -> Site:
        if uri not in self.sites:
            self.sites[uri] = Site(uri).open()
        return self.sites[uri]

    def close(self) -> None:
        for s in self.sites.values():
            s.close()
        for h in self.hvs.values():
            h.close()
        self.sites.clear()
        self.hvs.clear()

    def __enter__(self) -> Sites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_vm(sites: Sites, pv: PlanVM) -> DRVM:
    """The replica of ``pv`` at its DR host (UsageError if there is none)."""
    hv = sites.hv(pv.to)
    site = sites.site(pv.to)
    st = load_state(site, pv.directory)
    where = f"{pv.directory} on {redact_uri(pv.to)}"
    if st is None:
        raise UsageError(f"{pv.name}: no replica in {where}: run `vmdr replicate {pv.name}` "
                         "first")
    if not st.points:
        raise UsageError(f"{pv.name}: the replica in {where} has no restore point yet")
    try:
        standby = hv.lookup(st.standby)
    except DomainNotFound:
        raise DomainNotFound(f"{pv.name}: the standby domain {st.standby!r} is not defined "
                             f"on {redact_uri(pv.to)}: run a replica cycle to define it") \
            from None
    if standby.uuid != st.standby_uuid:
        raise UsageError(f"{pv.name}: domain {st.standby!r} on {redact_uri(pv.to)} is not "
                         "the replica's standby (UUID differs)")
    # an HA copy running on overlays over the standby's disks: a failover would revert
    # them, a test failover and failback use them: ReplicaInUse (exit 13)
    warnings = replica_guard.check(site, hv, pv.directory, pv.name,
                                   what="a failover, test failover or failback",
                                   failover_ok=True)
    return DRVM(pv, hv, site, st, standby, warnings=warnings)


def check_networks(vm: DRVM, names: list[str], isolated: bool = False) -> None:
    for n in names:
        try:
            net = vm.hv.network(n)
        except NetworkNotFound:
            raise NetworkNotFound(f"{vm.name}: network {n!r} does not exist on the DR host "
                                  f"{redact_uri(vm.pv.to)}") from None
        if isolated and net.forwards:
            raise UsageError(f"{vm.name}: test network {n!r} forwards traffic: a test "
                             "failover needs an isolated network (no <forward>)")


def source_of(st: ReplicaState, dr_net: str) -> str:
    """The source network a DR network of the standby came from."""
    return next((s for s, d in st.network_map.items() if d == dr_net), dr_net)


def apply_plan_networks(vm: DRVM, plan: RecoveryPlan) -> None:
    """Move the standby's NICs to the plan's DR networks where the plan maps a source
    network differently from the replica (redefines the standby, keeping its UUID)."""
    xml = vm.standby.xml(inactive=True)
    moves = {}
    for dr in interface_networks(xml):
        want = plan.network_map.get(source_of(vm.state, dr))
        if want and want != dr:
            moves[dr] = want
    if moves:
        check_networks(vm, list(moves.values()))
        vm.hv.define(map_networks(xml, moves))
        vm.standby = vm.hv.lookup(vm.state.standby)


def test_networks(vm: DRVM, plan: RecoveryPlan, bubble: str) -> dict[str, str]:
    """DR network → test network: the plan's test mapping, else the run's bubble."""
    out = {}
    for dr in vm.dr_networks():
        out[dr] = plan.test_network_map.get(source_of(vm.state, dr), bubble)
    given = sorted({n for n in out.values() if n != bubble})
    check_networks(vm, given, isolated=True)
    return out


def create_bubble(hv: Hypervisor, name: str) -> None:
    """An isolated network with no uplink, no host address and no DHCP."""
    hv.destroy_network(name)  # a leftover of a killed run
    hv.create_network(f"<network><name>{name}</name><bridge name='{name}' stp='on' "
                      "delay='0'/></network>")
    if hv.network(name).forwards:
        raise HypervisorError(f"test network {name} forwards traffic; refusing to use it")


def cleanup_leftovers(vm: DRVM, plan: str) -> list[str]:
    """Test copies and overlays a killed run of this plan left at the DR site."""
    out = []
    tname = test_name(plan, vm.name)
    try:
        d = vm.hv.lookup(tname)
        d.destroy()
        if d.is_persistent():
            d.undefine()
        out.append(f"domain {tname}")
    except DomainNotFound:
        pass
    p = vm.site.run(_LEFTOVERS, vm.pv.directory)
    out += [f"overlays {ln}" for ln in p.stdout.decode().split() if ln]
    return out


def test_dir(vm: DRVM, run: str) -> str:
    return f"{vm.pv.directory}/test-{run}"


def export_owner(qemu: tuple[int, int] | None) -> tuple[str, str]:
    """The reader script's ``quid qgid`` arguments for QEMU's ``(uid, gid)`` at the DR host:
    the export socket becomes 0660 with group ``qgid`` unless QEMU runs as the user who
    serves it (then 0600); ``("", "")`` (QEMU runs as the connecting user) gives 0600."""
    if qemu is None:
        return "", ""
    return str(qemu[0]), str(qemu[1])


def freeze(vm: DRVM, run: str, point: RestorePoint, timeout: float = 60) -> str:
    """Serve ``point`` of every standby disk read-only (pinned) and make the throw-away
    overlays over it; the test directory. Call it while holding the replica lock (no
    cycle may rotate the point before the pin is held); a cycle may run once it returns."""
    if vm.state.writing:
        raise UsageError(f"{vm.name}: a replica cycle is writing (or was interrupted): "
                         "test when the cycle is done (or run one cycle)")
    d = test_dir(vm, run)
    quid, qgid = export_owner(vm.hv.qemu_identity())
    for t, disk in sorted(vm.state.disks.items()):
        proc = vm.site.spawn(_READER, d, t, str(disk["path"]), point.name,
                             str(int(disk["size"])), quid, qgid)
        vm.readers.append(proc)
        line = read_line(proc, timeout)
        if not line.startswith("ready "):
            err = ""
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # the script exits when qemu-nbd could not serve the point
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr \
                    else ""
            vm.site.stop(proc)
            why = err.splitlines()[0] if err else "no answer"
            raise HypervisorError(f"{vm.name}: cannot serve restore point {point.name} of "
                                  f"disk {t} on {vm.site.where}: {why}")
        vm.exports[t] = line[len("ready "):]
    vm.point = point.name
    return d




def nbd_backing(xml: str, exports: dict[str, str]) -> str:
    """``xml`` with each disk in ``exports`` (target → unix socket) backed by that NBD
    export (raw): the test copy's overlay over the frozen restore point."""
    root = parse_xml(xml)
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        sock = exports.get(tgt.get("dev", "") if tgt is not None else "")
        if sock is None:
            continue
        for old in disk.findall("backingStore"):
            disk.remove(old)
        bs = ET.Element("backingStore", type="network")
        ET.SubElement(bs, "format", type="raw")
        src = ET.SubElement(bs, "source", protocol="nbd")
        ET.SubElement(src, "host", transport="unix", socket=sock)
        src_el = disk.find("source")
        at = list(disk).index(src_el) + 1 if src_el is not None else len(disk)
        disk.insert(at, bs)
    return ET.tostring(root, encoding="unicode")


def start_test_copy(vm: DRVM, plan: str, run: str, nets: dict[str, str]) -> str:
    """Start the transient test copy on the overlays :func:`freeze` made; the overlay
    directory."""
    d = test_dir(vm, run)
    paths = {t: (f"{d}/{t}.qcow2", "qcow2") for t in sorted(vm.state.disks)}
    name = test_name(plan, vm.name)
    vars_src = vm.standby.info().nvram_path  # UEFI: the test copy gets its own variables
    if vars_src:
        vm.site.run('cp -- "$1" "$2"', vars_src, f"{d}/VARS.fd")
    xml = rewrite_domain_xml(vm.standby.xml(inactive=True), new_name=name, new_uuid=True,
                             new_macs=False, disk_paths=paths,
                             nvram_path=f"{d}/VARS.fd" if vars_src else None)
    xml = nbd_backing(relocate_console_logs(map_networks(xml, nets), d, name), vm.exports)
    vm.dom = vm.hv.create_transient(xml)
    vm.started_here = True
    return d


def remove_test_copy(vm: DRVM, plan: str, directory: str | None) -> list[str]:
    """Destroy the test copy, stop its readers (the pin goes) and delete its overlays;
    what is left (should be nothing)."""
    left = []
    if vm.dom is not None:
        try:
            vm.dom.destroy()
        except VmdrError as exc:
            left.append(f"{vm.name}: {exc.message}")
    for proc in vm.readers:
        vm.site.stop(proc)
    vm.readers.clear()
    if directory:
        vm.site.run('rm -rf -- "$1"', directory)
        if vm.site.run('[ -e "$1" ]', directory, ok=(0, 1)).returncode == 0:
            left.append(f"{directory} on {vm.site.where}")
    if test_name(plan, vm.name) in vm.hv.list_domains():
        left.append(f"domain {test_name(plan, vm.name)}")
    return left


def choose_point(st: ReplicaState, at: datetime | None) -> RestorePoint:
    """The newest restore point, or the newest at or before ``at``."""
    if at is None:
        newest = st.newest
        assert newest is not None
        return newest
    ok = [p for p in st.points if datetime.fromisoformat(p.time) <= at]
    if not ok:
        oldest = st.points[0].time if st.points else "none"
        raise UsageError(f"{st.vm}: no restore point at or before {at.isoformat()} (oldest: "
                         f"{oldest})")
    return ok[-1]


def revert(vm: DRVM, point: RestorePoint) -> None:
    """Set every standby disk's content to ``point`` (the other points stay)."""
    for disk in vm.state.disks.values():
        vm.site.run(_REVERT, str(disk["path"]), point.name)


def quote(args: list[str]) -> str:
    return shlex.join(args)
