"""A boot sandbox: a snapshot's VM as a transient domain over NBD-backed qcow2 overlays.

Layout, one directory per run under ``<scratch_dir>/verify/<domain-name>/``::

    state.json        owner pid + start time, domain name/UUID, nbdkit pids, private dir
    sock/<disk>.sock  the NBD exports (owned by the QEMU user)
    <disk>.qcow2      overlay taking every write; its backing file is the NBD export
    console.log       the serial console (virtlogd)
    nvram.fd          the saved UEFI variables, if the VM had any

The domain gets a new name and UUID, no NIC (or one on an isolated network, new MAC),
no host devices, shares or TPM, and disks that were not backed up are dropped — it can
never touch the production VM's images, addresses or devices. It is started with
``VIR_DOMAIN_START_AUTODESTROY``: libvirt destroys it when vmdr's connection closes,
even on ``kill -9``. nbdkit dies with vmdr too (``--exit-with-parent``); whatever is
left (files, and anything a crashed libvirtd kept) :func:`cleanup_leftovers` removes on
the next run once the owner pid is dead.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

from vmdr.errors import DomainNotFound, HypervisorError, VmdrError
from vmdr.hypervisor import Domain, Hypervisor, parse_xml, random_mac, rewrite_domain_xml
from vmdr.hypervisor.state import require_reachable
from vmdr.procutil import proc_start_time
from vmdr.timeutil import utcnow

from .png import PNG_SIGNATURE, ppm_to_png
from .server import is_nbdkit

NAME_PREFIX = "vmdr-verify-"
META_NS = "urn:vmdr:verify"
_DROP = ("hostdev", "filesystem", "redirdev", "smartcard", "tpm", "shmem", "vsock")


def verify_root(scratch_dir: str) -> str:
    return os.path.join(scratch_dir, "verify")




@dataclass
class SandboxState:
    domain: str
    uuid: str
    pid: int = field(default_factory=os.getpid)
    starttime: str = ""
    nbd_pids: list[int] = field(default_factory=list)
    private_dir: str | None = None

    def owner_alive(self) -> bool:
        return proc_start_time(self.pid) == self.starttime


def write_state(sandbox: str, st: SandboxState) -> None:
    if not st.starttime:
        st.starttime = proc_start_time(st.pid) or ""
    tmp = os.path.join(sandbox, "state.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(st), f)
    os.replace(tmp, os.path.join(sandbox, "state.json"))


def read_state(sandbox: str) -> SandboxState | None:
    try:
        with open(os.path.join(sandbox, "state.json"), encoding="utf-8") as f:
            d = json.load(f)
        return SandboxState(str(d["domain"]), str(d["uuid"]), int(d["pid"]),
                            str(d.get("starttime", "")), [int(p) for p in d.get("nbd_pids", [])],
                            d.get("private_dir"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_sandbox(scratch_dir: str, name: str, qemu_user: str | None) -> str:
    """Create ``verify/<name>`` (and the socket dir), traversable by the QEMU user."""
    root = verify_root(scratch_dir)
    os.makedirs(root, mode=0o711, exist_ok=True)
    if qemu_user and os.geteuid() == 0:
        require_reachable(scratch_dir, qemu_user)
        for d in (scratch_dir, root):
            mode = os.stat(d).st_mode & 0o7777
            os.chmod(d, mode | 0o111)  # noqa: S103 - search only: QEMU opens overlays below
    path = os.path.join(root, name)
    os.mkdir(path, 0o711)
    os.mkdir(os.path.join(path, "sock"), 0o700)
    give_to(os.path.join(path, "sock"), qemu_user)
    return path


def create_overlay(path: str, nbd_uri: str, size: int, qemu_user: str | None) -> None:
    """A qcow2 overlay whose backing file is the (raw) NBD export."""
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", nbd_uri,
                        path, str(size)], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise HypervisorError(f"cannot create overlay {path}: "
                              f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    give_to(path, qemu_user)


def give_to(path: str, user: str | None) -> None:
    """chown *path* to *user* (the QEMU user) when running as root."""
    if user and os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def has_agent_channel(xml: str) -> bool:
    return any(t.get("name") == "org.qemu.guest_agent.0"
               for t in parse_xml(xml).findall("./devices/channel/target"))


def sandbox_xml(
    xml: str, *, name: str, overlays: dict[str, tuple[str, str]], console_log: str,
    network: str | None = None, nvram_path: str | None = None, sandbox: str = "",
) -> str:
    """The sandbox domain XML. *overlays* maps a disk target to (overlay path, socket)."""
    base = rewrite_domain_xml(xml, new_name=name, new_uuid=True, new_macs=True,
                              disk_paths={d: (p, "qcow2") for d, (p, _) in overlays.items()},
                              nvram_path=nvram_path)
    root = parse_xml(base)
    devices = root.find("devices")
    if devices is None:
        raise ValueError("domain XML has no <devices>")
    for disk in list(devices.findall("disk")):
        tgt = disk.find("target")
        dev = tgt.get("dev") if tgt is not None else None
        if dev in overlays:
            _add_nbd_backing(disk, dev or "", overlays[dev or ""][1])
            if disk.get("device") == "lun":
                disk.set("device", "disk")  # SCSI passthrough needs a block device
        elif disk.get("device", "disk") in ("disk", "lun"):
            devices.remove(disk)  # not in the snapshot: never attach the production image
        else:
            for src in disk.findall("source"):
                disk.remove(src)  # empty CD-ROM / floppy drive
    for tag in _DROP:
        for el in devices.findall(tag):
            devices.remove(el)
    _set_network(devices, network)
    _set_console(devices, console_log)
    for ch in devices.findall("channel"):
        if ch.get("type") == "unix":
            for src in ch.findall("source"):
                ch.remove(src)  # libvirt makes a fresh socket path
    for g in devices.findall("graphics"):
        g.set("autoport", "yes")
        g.attrib.pop("port", None)
        if g.get("type") in ("vnc", "spice"):
            g.set("listen", "127.0.0.1")
            for lst in g.findall("listen"):
                g.remove(lst)
            ET.SubElement(g, "listen", {"type": "address", "address": "127.0.0.1"})
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for child in list(meta):
        meta.remove(child)  # e.g. ownership records of the original
    ET.SubElement(meta, f"{{{META_NS}}}sandbox",
                  {"pid": str(os.getpid()), "dir": sandbox})
    ET.register_namespace("vmdrverify", META_NS)
    return ET.tostring(root, encoding="unicode")


def _add_nbd_backing(disk: ET.Element, dev: str, sock: str) -> None:
    src = disk.find("source")
    bs = ET.Element("backingStore", {"type": "network"})
    ET.SubElement(bs, "format", {"type": "raw"})
    s = ET.SubElement(bs, "source", {"protocol": "nbd", "name": dev})
    ET.SubElement(s, "host", {"transport": "unix", "socket": sock})
    ET.SubElement(bs, "backingStore")
    pos = list(disk).index(src) + 1 if src is not None else len(disk)
    disk.insert(pos, bs)
    drv = disk.find("driver")
    if drv is not None:
        for attr in ("discard", "detect_zeroes", "copy_on_read"):
            drv.attrib.pop(attr, None)


def _set_network(devices: ET.Element, network: str | None) -> None:
    """Drop every NIC; with *network*, add one (new MAC) on that isolated network."""
    model = None
    for iface in devices.findall("interface"):
        model = model if model is not None else iface.find("model")
        devices.remove(iface)
    if network is None:
        return
    new = ET.SubElement(devices, "interface", {"type": "network"})
    ET.SubElement(new, "mac", {"address": random_mac()})
    ET.SubElement(new, "source", {"network": network})
    new.append(model if model is not None else ET.Element("model", {"type": "virtio"}))


def _set_console(devices: ET.Element, console_log: str) -> None:
    serials = devices.findall("serial")
    if not serials:
        serial = ET.SubElement(devices, "serial", {"type": "pty"})
        ET.SubElement(serial, "target", {"port": "0"})
        serials = [serial]
    for i, serial in enumerate(serials):
        for old in serial.findall("log"):
            serial.remove(old)
        if serial.get("type") == "file":
            serial.set("type", "pty")
            for src in serial.findall("source"):
                serial.remove(src)
        if i == 0:
            serial.insert(0, ET.Element("log", {"file": console_log, "append": "off"}))
    for con in devices.findall("console"):
        if con.get("type") == "file":
            devices.remove(con)


def screenshot_png(dom: Domain) -> bytes:
    """The domain's screen as PNG (HypervisorError if it has no display)."""
    shot = dom.console().screenshot()
    if shot.data.startswith(PNG_SIGNATURE):
        return shot.data  # QEMU ≥ 7.1 may hand out PNG already
    try:
        return ppm_to_png(shot.data)
    except ValueError as exc:
        raise HypervisorError(f"screenshot ({shot.mime or 'unknown type'}): {exc}") from None


def destroy_domain(hv: Hypervisor | None, st: SandboxState) -> list[str]:
    """Destroy (and undefine, if someone made it persistent) the sandbox domain."""
    if hv is None or not (st.uuid or st.domain.startswith(NAME_PREFIX)):
        return []
    done = []
    try:
        dom = hv.lookup(st.uuid or st.domain)
        if dom.is_active():
            dom.destroy()
            done.append(f"destroyed {st.domain}")
        if dom.is_persistent():
            dom.undefine()
    except DomainNotFound:
        pass  # gone with its connection (autodestroy): the usual case
    except VmdrError:
        pass  # libvirt destroys it when our connection closes; cleanup retries later
    return done


def teardown(hv: Hypervisor | None, st: SandboxState, sandbox: str) -> list[str]:
    """Destroy the domain, kill nbdkit, remove the files; what was done."""
    done = destroy_domain(hv, st)
    for pid in st.nbd_pids:
        if is_nbdkit(pid):
            os.kill(pid, signal.SIGTERM)
            done.append(f"stopped nbdkit {pid}")
    if st.nbd_pids:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(is_nbdkit(p) for p in st.nbd_pids):
            time.sleep(0.1)
        for pid in st.nbd_pids:
            if is_nbdkit(pid):
                os.kill(pid, signal.SIGKILL)
    if st.private_dir and os.path.basename(st.private_dir).startswith("vmdr-serve-"):
        shutil.rmtree(st.private_dir, ignore_errors=True)
    if os.path.isdir(sandbox):
        shutil.rmtree(sandbox, ignore_errors=True)
        done.append(f"removed {sandbox}")
    return done


def cleanup_leftovers(hv: Hypervisor | None, scratch_dir: str) -> list[str]:
    """Remove sandboxes whose vmdr process is gone (domains, nbdkit, files)."""
    done: list[str] = []
    root = verify_root(scratch_dir)
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if not entry.startswith(NAME_PREFIX) or not os.path.isdir(path):
                continue
            st = read_state(path)
            if st is None:
                if utcnow().timestamp() - os.stat(path).st_mtime < 600:
                    continue  # being set up right now, maybe
                st = SandboxState(entry, "", pid=0)
            elif st.owner_alive():
                continue
            done += teardown(hv, st, path)
    if hv is not None:
        done += _orphan_domains(hv)
    return done


def _orphan_domains(hv: Hypervisor) -> list[str]:
    done = []
    for name in hv.list_domains():
        if not name.startswith(NAME_PREFIX):
            continue
        try:
            dom = hv.lookup(name)
            el = parse_xml(dom.xml()).find(f"metadata/{{{META_NS}}}sandbox")
            if el is None or proc_start_time(int(el.get("pid", "0"))) is not None:
                continue
            dom.destroy()
            if dom.is_persistent():
                dom.undefine()
            done.append(f"destroyed orphan {name}")
        except VmdrError:
            continue  # gone meanwhile, or not ours to touch
    return done
