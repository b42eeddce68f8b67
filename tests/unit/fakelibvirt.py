"""A fake ``libvirt`` module for unit tests (in the spirit of nova's fixtures/libvirt.py).

Only what ``vmdr.hypervisor`` calls is modelled. State lives in :data:`HOSTS` (URI ->
:class:`virConnect`), so a test builds domains with :func:`add_domain` and then goes
through ``vmdr.hypervisor.connect``. Install it with ``_compat.install(fakelibvirt)``.
"""

from __future__ import annotations

import json
import uuid as uuidlib
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import Any

# -- error codes (values as in libvirt's virerror.h) --------------------------------------
VIR_ERR_OK = 0
VIR_ERR_INTERNAL_ERROR = 1
VIR_ERR_NO_SUPPORT = 3
VIR_ERR_NO_CONNECT = 5
VIR_ERR_INVALID_ARG = 8
VIR_ERR_SYSTEM_ERROR = 38
VIR_ERR_RPC = 39
VIR_ERR_NO_DOMAIN = 42
VIR_ERR_NO_NETWORK = 43
VIR_ERR_ARGUMENT_UNSUPPORTED = 74
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_AUTH_FAILED = 45
VIR_ERR_OPERATION_UNSUPPORTED = 84
VIR_ERR_AGENT_UNRESPONSIVE = 86
VIR_ERR_BLOCK_COPY_ACTIVE = 83
VIR_ERR_AUTH_CANCELLED = 79
VIR_ERR_AGENT_UNSYNCED = 97
VIR_ERR_AUTH_UNAVAILABLE = 94
VIR_ERR_NO_DOMAIN_CHECKPOINT = 103
VIR_ERR_CHECKPOINT_INCONSISTENT = 109
VIR_ERR_NO_DOMAIN_BACKUP = 104
VIR_FROM_QEMU = 10

# -- domain states and flags --------------------------------------------------------------
VIR_DOMAIN_NOSTATE = 0
VIR_DOMAIN_RUNNING = 1
VIR_DOMAIN_BLOCKED = 2
VIR_DOMAIN_PAUSED = 3
VIR_DOMAIN_SHUTDOWN = 4
VIR_DOMAIN_SHUTOFF = 5
VIR_DOMAIN_CRASHED = 6
VIR_DOMAIN_PMSUSPENDED = 7
VIR_DOMAIN_PAUSED_USER = 1
VIR_DOMAIN_PAUSED_IOERROR = 5
VIR_DOMAIN_START_AUTODESTROY = 2
VIR_DOMAIN_BLOCK_COPY_BANDWIDTH = "bandwidth"
VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB = 4
VIR_DOMAIN_BLOCK_COPY_REUSE_EXT = 2
VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES = 8
VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE = 0
VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT = 1
VIR_IP_ADDR_TYPE_IPV4 = 0
VIR_DOMAIN_XML_SECURE = 1
VIR_DOMAIN_XML_INACTIVE = 2
VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE = 1
VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE = 2
VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE = 4
VIR_DOMAIN_CHECKPOINT_XML_SECURE = 1
VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN = 2
VIR_DOMAIN_CHECKPOINT_XML_SIZE = 4
VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN = 1
VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY = 2
VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA = 4
VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY = 16
VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE = 64
VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC = 128
VIR_DOMAIN_BLOCK_COMMIT_SHALLOW = 1
VIR_DOMAIN_BLOCK_COMMIT_ACTIVE = 4
VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT = 2
VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES = 1
VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES = 1
VIR_DOMAIN_JOB_NONE = 0
VIR_DOMAIN_JOB_UNBOUNDED = 2
VIR_DOMAIN_JOB_OPERATION_BACKUP = 9
VIR_DOMAIN_UNDEFINE_NVRAM = 4
VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA = 2
VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA = 16


class libvirtError(Exception):
    """Fake libvirt.libvirtError."""

    def __init__(self, msg: str, code: int = VIR_ERR_INTERNAL_ERROR, int1: int = -1) -> None:
        super().__init__(msg)
        self._code = code
        self._int1 = int1

    def get_error_code(self) -> int:
        return self._code

    def get_error_domain(self) -> int:
        return VIR_FROM_QEMU

    def get_int1(self) -> int:
        return self._int1


HOSTS: dict[str, virConnect] = {}
CALLS: list[tuple[str, Any]] = []  # (call name, argument) in order, for assertions


def reset() -> None:
    """Forget every host, domain and recorded call."""
    HOSTS.clear()
    CALLS.clear()


def install() -> Any:
    """Make vmdr.hypervisor use this module; returns it (pair with :func:`uninstall`)."""
    import sys

    from vmdr.hypervisor import _compat

    reset()
    _compat.install(sys.modules[__name__])
    return sys.modules[__name__]


def uninstall() -> None:
    """Back to the real libvirt bindings."""
    from vmdr.hypervisor import _compat

    reset()
    _compat._libvirt = None
    _compat._libvirt_qemu = None


def calls(name: str) -> list[Any]:
    """Arguments of the recorded calls named ``name``."""
    return [arg for n, arg in CALLS if n == name]


def registerErrorHandler(f: Any, ctx: Any) -> None:
    pass


def open(uri: str) -> virConnect:
    if uri not in HOSTS:
        raise libvirtError(f"Failed to connect socket to '{uri}'", VIR_ERR_SYSTEM_ERROR)
    return HOSTS[uri]


openReadOnly = open


def host(uri: str = "qemu:///system") -> virConnect:
    """The fake host for ``uri`` (created on first use)."""
    return HOSTS.setdefault(uri, virConnect(uri))


def add_domain(xml: str, *, uri: str = "qemu:///system", active: bool = True,
               sizes: dict[str, int] | None = None) -> virDomain:
    """Define a domain on a fake host; ``sizes`` gives blockInfo capacities."""
    conn = host(uri)
    dom = virDomain(conn, xml, active=active, sizes=sizes or {})
    conn.domains[dom.name()] = dom
    return dom


def add_network(name: str, *, forward: bool = False, active: bool = True,
                uri: str = "qemu:///system") -> virNetwork:
    """A virtual network on a fake host (``forward``: it has a <forward mode='nat'/>)."""
    net = virNetwork(name, forward, active)
    host(uri).networks[name] = net
    return net


class Failing:
    """Mixin: ``obj.fail["methodName"] = libvirtError(...)`` makes that method raise it."""

    fail: dict[str, libvirtError]

    def __getattribute__(self, name: str) -> Any:
        fail = object.__getattribute__(self, "__dict__").get("fail") or {}
        if name in fail:
            def raiser(*_a: Any, **_k: Any) -> Any:
                raise fail[name]
            return raiser
        return object.__getattribute__(self, name)


class virNetwork:
    def __init__(self, name: str, forward: bool, active: bool) -> None:
        self._name = name
        self.forward = forward
        self.active = active

    def XMLDesc(self, flags: int = 0) -> str:
        fwd = "<forward mode='nat'/>" if self.forward else ""
        return f"<network><name>{self._name}</name>{fwd}<bridge name='virbr9'/></network>"

    def isActive(self) -> int:
        return int(self.active)


class virStream:
    def __init__(self, conn: virConnect) -> None:
        self.conn = conn
        self.data = b""
        self.state = "open"

    def recvAll(self, handler: Any, opaque: Any) -> None:
        for i in range(0, len(self.data), 7):  # in pieces, like a real stream
            handler(self, self.data[i:i + 7], opaque)

    def finish(self) -> None:
        self.state = "finished"

    def abort(self) -> None:
        self.state = "aborted"


class virConnect(Failing):
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.domains: dict[str, virDomain] = {}
        self.networks: dict[str, virNetwork] = {}
        self.closed = False
        self.fail: dict[str, libvirtError] = {}

    def close(self) -> int:
        self.closed = True
        for name, dom in list(self.domains.items()):
            if dom.autodestroy:
                del self.domains[name]
        return 0

    def networkLookupByName(self, name: str) -> virNetwork:
        if name not in self.networks:
            raise libvirtError(f"Network not found: no network with matching name '{name}'",
                               VIR_ERR_NO_NETWORK)
        return self.networks[name]

    def createXML(self, xml: str, flags: int = 0) -> virDomain:
        CALLS.append(("createXML", (xml, flags)))
        dom = virDomain(self, xml, active=True, sizes={})
        if dom.name() in self.domains:
            raise libvirtError(f"domain '{dom.name()}' already exists", VIR_ERR_OPERATION_INVALID)
        dom.persistent = False
        dom.autodestroy = bool(flags & VIR_DOMAIN_START_AUTODESTROY)
        self.domains[dom.name()] = dom
        return dom

    def newStream(self, flags: int = 0) -> virStream:
        return virStream(self)

    def getURI(self) -> str:
        return self.uri

    def lookupByName(self, name: str) -> virDomain:
        if name not in self.domains:
            raise libvirtError(f"Domain not found: no domain with matching name '{name}'",
                               VIR_ERR_NO_DOMAIN)
        return self.domains[name]

    def lookupByUUIDString(self, uuid: str) -> virDomain:
        for d in self.domains.values():
            if d.UUIDString() == uuid:
                return d
        raise libvirtError(f"Domain not found: no domain with matching uuid '{uuid}'",
                           VIR_ERR_NO_DOMAIN)

    def listAllDomains(self, flags: int = 0) -> list[virDomain]:
        return list(self.domains.values())

    def defineXML(self, xml: str) -> virDomain:
        CALLS.append(("defineXML", xml))
        name = ET.fromstring(xml).findtext("name") or ""
        if name in self.domains:
            self.domains[name].set_xml(xml)
            return self.domains[name]
        dom = virDomain(self, xml, active=False, sizes={})
        self.domains[name] = dom
        return dom


class virDomainCheckpoint:
    def __init__(self, dom: virDomain, xml: str) -> None:
        self.dom = dom
        root = ET.fromstring(xml)
        self.name = root.findtext("name") or ""
        self.xml = xml
        self.bitmaps = [d.get("name", "") for d in root.findall("./disks/disk")
                        if d.get("checkpoint", "bitmap") == "bitmap"]

    def getName(self) -> str:
        return self.name

    def getXMLDesc(self, flags: int = 0) -> str:
        root = ET.fromstring(self.xml)
        for d in root.findall("./disks/disk"):
            if d.get("checkpoint", "bitmap") == "bitmap":
                d.set("bitmap", self.name)
                if flags & VIR_DOMAIN_CHECKPOINT_XML_SIZE and \
                        (self.name, d.get("name")) not in self.dom.broken_bitmaps:
                    d.set("size", "65536")
        if not flags & VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN and root.find("domain") is None:
            root.append(ET.fromstring(self.dom.xml))
        return ET.tostring(root, encoding="unicode")

    def delete(self, flags: int = 0) -> int:
        CALLS.append(("checkpoint.delete", (self.name, flags)))
        if any((self.name, b) in self.dom.broken_bitmaps for b in self.bitmaps) and \
                not flags & VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY:
            raise libvirtError("missing bitmap", VIR_ERR_CHECKPOINT_INCONSISTENT)
        self.dom.checkpoints.pop(self.name, None)
        return 0


class virDomain(Failing):
    def __init__(self, conn: virConnect, xml: str, *, active: bool, sizes: dict[str, int]) -> None:
        self.fail: dict[str, libvirtError] = {}
        self.conn = conn
        self.active = active
        self.paused: int | None = None  # a VIR_DOMAIN_PAUSED_* reason while paused
        self.persistent = True
        self.autodestroy = False
        self.screen: tuple[str, bytes] | None = None  # (mime, data) of the display
        self.addresses: dict[int, dict[str, Any]] = {}  # source -> interfaceAddresses reply
        self.copies: dict[str, list[Any]] = {}  # target -> [dest xml, params, flags, cur, end]
        self.sizes = sizes
        self.checkpoints: dict[str, virDomainCheckpoint] = {}
        self.broken_bitmaps: set[tuple[str, str]] = set()
        self.job: str | None = None  # backup XML of the running job
        self.block_jobs: dict[str, str] = {}  # target -> original source
        self.agent: Any = None  # callable(cmd dict) -> reply dict, or None: not connected
        self.fail_backup: list[libvirtError] = []  # raised by the next backupBegin calls
        self.orphan_bitmaps: set[str] = set()  # bitmaps in the image without a checkpoint
        self.inactive_xml = ""
        self.set_xml(xml)

    def set_xml(self, xml: str) -> None:
        root = ET.fromstring(xml)
        if root.find("uuid") is None:
            u = ET.Element("uuid")
            u.text = str(uuidlib.uuid4())
            root.insert(1, u)
        self.xml = ET.tostring(root, encoding="unicode")
        self.inactive_xml = self.xml

    # inspection
    def name(self) -> str:
        return ET.fromstring(self.xml).findtext("name") or ""

    def UUIDString(self) -> str:
        return ET.fromstring(self.xml).findtext("uuid") or ""

    def connect(self) -> virConnect:
        return self.conn

    def isActive(self) -> int:
        return int(self.active)

    def isPersistent(self) -> int:
        return int(self.persistent)

    def autostart(self) -> int:
        return int(getattr(self, "_autostart", False))

    def setAutostart(self, on: int) -> int:
        if not self.persistent:
            raise libvirtError("Requested operation is not valid: cannot set autostart "
                               "for transient domain", VIR_ERR_OPERATION_INVALID)
        self._autostart = bool(on)
        return 0

    def state(self, flags: int = 0) -> list[int]:
        if self.active and self.paused is not None:
            return [VIR_DOMAIN_PAUSED, self.paused]
        return [VIR_DOMAIN_RUNNING if self.active else VIR_DOMAIN_SHUTOFF, 1]

    def suspend(self) -> int:
        if not self.active:
            raise libvirtError("Requested operation is not valid: domain is not running",
                               VIR_ERR_OPERATION_INVALID)
        self.paused = VIR_DOMAIN_PAUSED_USER
        return 0

    def resume(self) -> int:
        if not self.active or self.paused is None:
            raise libvirtError("Requested operation is not valid: domain is not paused",
                               VIR_ERR_OPERATION_INVALID)
        self.paused = None
        return 0

    def screenshot(self, stream: virStream, screen: int, flags: int = 0) -> str:
        if not self.active or self.screen is None:
            raise libvirtError("Requested operation is not valid: no screen",
                               VIR_ERR_OPERATION_INVALID)
        stream.data = self.screen[1]
        return self.screen[0]

    def interfaceAddresses(self, source: int, flags: int = 0) -> dict[str, Any]:
        if source not in self.addresses:
            raise libvirtError("QEMU guest agent is not connected", VIR_ERR_AGENT_UNRESPONSIVE)
        return self.addresses[source]

    def blockCopy(self, disk: str, destxml: str, params: Any = None, flags: int = 0) -> int:
        CALLS.append(("blockCopy", (disk, destxml, params, flags)))
        if not self.active:
            raise libvirtError("domain is not running", VIR_ERR_OPERATION_INVALID)
        if disk in self.block_jobs or disk in self.copies:
            raise libvirtError(f"block copy still active: disk '{disk}' already in active "
                               "block job", VIR_ERR_BLOCK_COPY_ACTIVE)
        self.copies[disk] = [destxml, params, flags, 0, self.sizes.get(disk, 1 << 20)]
        return 0

    def copy_progress(self, disk: str, cur: int) -> None:
        """Test helper: the copy of ``disk`` has reached ``cur`` bytes."""
        self.copies[disk][3] = cur

    def info(self) -> list[int]:
        return [self.state()[0], 1048576, 1048576, 2, 0]

    def XMLDesc(self, flags: int = 0) -> str:
        return self.inactive_xml if flags & VIR_DOMAIN_XML_INACTIVE else self.xml

    def blockInfo(self, target: str, flags: int = 0) -> list[int]:
        if target not in self.sizes:
            raise libvirtError(f"invalid argument: invalid path {target}", VIR_ERR_INVALID_ARG)
        return [self.sizes[target], 0, 0]

    # checkpoints
    def checkpointCreateXML(self, xml: str, flags: int = 0) -> virDomainCheckpoint:
        CALLS.append(("checkpointCreateXML", (xml, flags)))
        cp = virDomainCheckpoint(self, xml)
        if flags & VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE and \
                any((cp.name, b) in self.broken_bitmaps for b in cp.bitmaps):
            raise libvirtError("missing or broken bitmap", VIR_ERR_CHECKPOINT_INCONSISTENT)
        self.checkpoints[cp.name] = cp
        return cp

    def checkpointLookupByName(self, name: str, flags: int = 0) -> virDomainCheckpoint:
        if name not in self.checkpoints:
            raise libvirtError(f"no domain checkpoint with matching name '{name}'",
                               VIR_ERR_NO_DOMAIN_CHECKPOINT)
        return self.checkpoints[name]

    def listAllCheckpoints(self, flags: int = 0) -> list[virDomainCheckpoint]:
        return list(self.checkpoints.values())

    # backup jobs
    def backupBegin(self, xml: str, checkpoint_xml: str | None, flags: int = 0) -> int:
        CALLS.append(("backupBegin", (xml, checkpoint_xml)))
        if self.fail_backup:
            raise self.fail_backup.pop(0)
        if self.job is not None:
            raise libvirtError("another job is active", VIR_ERR_OPERATION_INVALID)
        root = ET.fromstring(xml)
        for d in root.findall("./disks/disk"):
            inc = d.get("incremental")
            if d.get("backupmode") == "incremental" and inc:
                if inc not in self.checkpoints:
                    raise libvirtError("no checkpoint", VIR_ERR_NO_DOMAIN_CHECKPOINT)
                if (inc, d.get("name")) in self.broken_bitmaps:
                    raise libvirtError(f"missing or broken bitmap '{inc}'",
                                       VIR_ERR_CHECKPOINT_INCONSISTENT)
        if checkpoint_xml:
            self.checkpointCreateXML(checkpoint_xml, 0)
        for d in root.findall("./disks/disk"):
            if d.get("backup") == "yes":
                d.set("exportname", d.get("name", ""))
                if d.get("backupmode") == "incremental":
                    d.set("exportbitmap", "backup-" + d.get("name", ""))
        self.job = ET.tostring(root, encoding="unicode")
        return 0

    def backupGetXMLDesc(self, flags: int = 0) -> str:
        if self.job is None:
            raise libvirtError("no domain backup job present", VIR_ERR_NO_DOMAIN_BACKUP)
        return self.job

    def jobStats(self, flags: int = 0) -> dict[str, int]:
        if self.job is None:
            return {"type": VIR_DOMAIN_JOB_NONE}
        return {"type": VIR_DOMAIN_JOB_UNBOUNDED, "operation": VIR_DOMAIN_JOB_OPERATION_BACKUP}

    def abortJob(self) -> int:
        CALLS.append(("abortJob", None))
        if self.job is None:
            raise libvirtError("no job is active on the domain", VIR_ERR_OPERATION_INVALID)
        self.job = None
        return 0

    # overlays
    def snapshotCreateXML(self, xml: str, flags: int = 0) -> SimpleNamespace:
        CALLS.append(("snapshotCreateXML", (xml, flags)))
        if flags & VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE and self.agent is None:
            raise libvirtError("QEMU guest agent is not connected", VIR_ERR_AGENT_UNRESPONSIVE)
        snap = ET.fromstring(xml)
        root = ET.fromstring(self.xml)
        for sd in snap.findall("./disks/disk"):
            if sd.get("snapshot") != "external":
                continue
            overlay = sd.find("source").get("file")  # type: ignore[union-attr]
            for disk in root.findall("./devices/disk"):
                if disk.find("target").get("dev") == sd.get("name"):  # type: ignore[union-attr]
                    src = disk.find("source")
                    self.block_jobs.setdefault("orig:" + sd.get("name", ""),
                                               src.get("file") or src.get("dev"))  # type: ignore
                    src.attrib.clear()  # type: ignore[union-attr]
                    src.set("file", overlay)  # type: ignore[union-attr,arg-type]
        self.xml = ET.tostring(root, encoding="unicode")
        self.inactive_xml = self.xml
        return SimpleNamespace()

    def blockCommit(self, disk: str, base: Any, top: Any, bandwidth: int = 0,
                    flags: int = 0) -> int:
        CALLS.append(("blockCommit", (disk, flags)))
        self.block_jobs[disk] = "commit"
        return 0

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, int]:
        if disk in self.copies:
            c = self.copies[disk]
            bw = int((c[1] or {}).get(VIR_DOMAIN_BLOCK_COPY_BANDWIDTH, 0))
            if not flags & VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES:
                bw >>= 20  # MiB/s without the flag
            return {"type": 2, "bandwidth": bw, "cur": c[3], "end": c[4]}
        if disk in self.block_jobs:
            return {"type": 4, "bandwidth": 0, "cur": 10, "end": 10}
        return {}

    def blockJobSetSpeed(self, disk: str, bandwidth: int, flags: int = 0) -> int:
        CALLS.append(("blockJobSetSpeed", (disk, bandwidth, flags)))
        if disk not in self.copies:
            raise libvirtError(f"disk {disk} does not have an active block job",
                               VIR_ERR_OPERATION_INVALID)
        if not flags & VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES:
            bandwidth <<= 20
        self.copies[disk][1] = {**(self.copies[disk][1] or {}),
                                VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth}
        return 0

    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        CALLS.append(("blockJobAbort", (disk, flags)))
        if disk in self.copies:
            dest, _params, _flags, cur, end = self.copies[disk]
            if flags & VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
                if cur < end:
                    raise libvirtError("block copy still active: disk not ready for pivot yet",
                                       VIR_ERR_BLOCK_COPY_ACTIVE)
                self._repoint(disk, ET.fromstring(dest))
            del self.copies[disk]
            return 0
        self.block_jobs.pop(disk, None)
        orig = self.block_jobs.pop("orig:" + disk, None)
        if flags & VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT and orig:
            root = ET.fromstring(self.xml)
            for d in root.findall("./devices/disk"):
                if d.find("target").get("dev") == disk:  # type: ignore[union-attr]
                    src = d.find("source")
                    src.attrib.clear()  # type: ignore[union-attr]
                    src.set("file", orig)  # type: ignore[union-attr]
            self.xml = ET.tostring(root, encoding="unicode")
            self.inactive_xml = self.xml
        return 0

    # guest agent and lifecycle
    def fsThaw(self, mountpoints: Any = None, flags: int = 0) -> int:
        CALLS.append(("fsThaw", None))
        if self.agent is None:
            raise libvirtError("QEMU guest agent is not connected", VIR_ERR_AGENT_UNRESPONSIVE)
        return 0

    def _repoint(self, disk: str, dest: ET.Element) -> None:
        """After a pivot: ``disk`` reads the copy (live and persistent definition)."""
        for attr in ("xml", "inactive_xml"):
            root = ET.fromstring(getattr(self, attr))
            for d in root.findall("./devices/disk"):
                if d.find("target").get("dev") != disk:  # type: ignore[union-attr]
                    continue
                for child in d.findall("source") + d.findall("backingStore"):
                    d.remove(child)
                d.insert(0, dest.find("source"))  # type: ignore[arg-type]
            setattr(self, attr, ET.tostring(root, encoding="unicode"))

    def create(self) -> int:
        if self.active:
            raise libvirtError("Requested operation is not valid: domain is already running",
                               VIR_ERR_OPERATION_INVALID)
        self.active = True
        return 0

    def destroy(self) -> int:
        if self.name() not in self.conn.domains:
            raise libvirtError("Domain not found", VIR_ERR_NO_DOMAIN)
        self.active = False
        self.paused = None
        self.job = None
        self.copies.clear()
        if not self.persistent:
            self.conn.domains.pop(self.name(), None)
        return 0

    def undefineFlags(self, flags: int = 0) -> int:
        if self.active:
            self.persistent = False
        else:
            self.conn.domains.pop(self.name(), None)
        return 0

    def undefine(self) -> int:
        return self.undefineFlags(0)


def _agent_command(dom: virDomain, cmd: str, timeout: int, flags: int) -> str:
    CALLS.append(("qemuAgentCommand", json.loads(cmd)["execute"]))
    if dom.agent is None:
        raise libvirtError("Guest agent is not responding: QEMU guest agent is not connected",
                           VIR_ERR_AGENT_UNRESPONSIVE)
    return json.dumps({"return": dom.agent(json.loads(cmd))})


def _monitor_command(dom: virDomain, cmd: str, flags: int) -> str:
    """QMP: query-named-block-nodes and block-dirty-bitmap-remove on one writable node."""
    req = json.loads(cmd)
    CALLS.append(("qemuMonitorCommand", (req["execute"], req.get("arguments"))))
    if req["execute"] == "query-named-block-nodes":
        names = [n for n, cp in dom.checkpoints.items() if cp.bitmaps] + \
            sorted(dom.orphan_bitmaps)
        nodes = [{"node-name": "libvirt-1-format", "ro": False,
                  "dirty-bitmaps": [{"name": n, "persistent": True} for n in names]},
                 {"node-name": "libvirt-2-format", "ro": True,
                  "dirty-bitmaps": [{"name": n, "persistent": True}
                                    for n in sorted(dom.orphan_bitmaps)]}]
        return json.dumps({"return": nodes})
    if req["execute"] == "block-dirty-bitmap-remove":
        name = req["arguments"]["name"]
        if name not in dom.orphan_bitmaps:
            return json.dumps({"error": {"class": "GenericError", "desc": "in use"}})
        dom.orphan_bitmaps.discard(name)
        return json.dumps({"return": {}})
    return json.dumps({"error": {"class": "CommandNotFound", "desc": "unknown command"}})


libvirt_qemu = SimpleNamespace(qemuAgentCommand=_agent_command,
                               qemuMonitorCommand=_monitor_command)


def disk_xml(target: str, source: str | None, *, fmt: str = "qcow2", device: str = "disk",
             dtype: str = "file", extra: str = "") -> str:
    """A ``<disk>`` element for test domains."""
    attr = {"file": "file", "block": "dev"}.get(dtype, "file")
    src = f"<source {attr}='{source}'/>" if source is not None else ""
    return (f"<disk type='{dtype}' device='{device}'><driver name='qemu' type='{fmt}'/>{src}"
            f"<target dev='{target}' bus='virtio'/>{extra}</disk>")


def domain_xml(name: str, disks: str, *, extra: str = "", uuid: str | None = None) -> str:
    """A small domain XML for tests."""
    u = f"<uuid>{uuid}</uuid>" if uuid else ""
    return (f"<domain type='qemu'><name>{name}</name>{u}<memory unit='KiB'>1048576</memory>"
            f"<vcpu>2</vcpu><os><type arch='x86_64'>hvm</type></os>"
            f"<devices>{disks}{extra}</devices></domain>")

