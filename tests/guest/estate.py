"""Test estate: build-once guest images and throwaway libvirt domains running them.

    from tests.guest.estate import TestVM, ensure_built

    with TestVM() as vm:               # copies images, defines + starts vmdr-test-<pid>-<hex>
        vm.wait_heartbeat(60)
        vm.agent_ping()
        vm.dom.fsFreeze(); vm.dom.fsThaw()
    # destroyed, undefined (incl. checkpoint/snapshot metadata) and files deleted

Console markers and the disk layout are documented in tests/guest/layout.py.
Environment: VMDR_GUEST_DIR (images dir, default /var/lib/libvirt/images/vmdr-test),
VMDR_LIBVIRT_URI (default qemu:///system), VMDR_GUEST_DOMAIN_TYPE (qemu|kvm).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.guest import build
from tests.guest import layout as L
from tests.guest.domxml import METADATA_NS, make_domain_xml

__all__ = [
    "GuestImages",
    "TestVM",
    "cleanup_stale",
    "ensure_built",
    "ensure_isolated_network",
    "make_domain_xml",
]

DEFAULT_PREFIX = "vmdr-test-"
HEARTBEAT_RE = re.compile(rf"{L.HEARTBEAT_MARKER} (\d+) ([\d.]+)")
OWNER_FILE = "owner.json"


def libvirt_uri() -> str:
    return os.environ.get("VMDR_LIBVIRT_URI", "qemu:///system")


def images_dir() -> Path:
    return Path(os.environ.get("VMDR_GUEST_DIR", str(build.DEFAULT_OUT)))


@dataclass(frozen=True)
class GuestImages:
    """The built base images (never boot these directly: TestVM works on copies)."""

    out_dir: Path
    boot_disk: Path
    data_disk: Path
    manifest_path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def files(self) -> list[dict[str, Any]]:
        """Known files of the data filesystem: [{"path", "size", "sha256"}], paths relative."""
        return list(self.manifest["files"])

    @property
    def vms_dir(self) -> Path:
        return self.out_dir / "vms"


_BUILT: dict[Path, GuestImages] = {}


def ensure_built(out_dir: Path | None = None, *, recheck: bool = False) -> GuestImages:
    """Build the images if missing or out of date (cached by input hash); return paths.

    The input hash is computed once per process and directory (``recheck=True`` redoes it).
    """
    out = out_dir or images_dir()
    cached = _BUILT.get(out)
    if cached and not recheck and cached.boot_disk.is_file() and cached.data_disk.is_file():
        return cached
    manifest = build.ensure(out)
    images = GuestImages(
        out,
        out / str(manifest["boot_disk"]),
        out / str(manifest["data_disk"]),
        out / build.MANIFEST,
        manifest,
    )
    _BUILT[out] = images
    return images


def _libvirt() -> Any:
    import libvirt  # system package python3-libvirt; imported lazily for unit tests

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise on retries
    return libvirt


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner() -> dict[str, str]:
    pid = os.getpid()
    return {"pid": str(pid), "starttime": _proc_start_time(pid) or "0"}


def _owner_alive(owner: dict[str, str] | None, name: str, prefix: str) -> bool | None:
    """Is the creator of ``name`` alive? None if unknown.

    Uses the recorded owner (pid + process start time) or else the pid in names of the form
    ``<prefix><pid>-...`` (domains created by code under test, e.g. restores, carry no owner
    metadata but usually derive their name from a TestVM name).
    """
    if owner and owner.get("pid", "").isdigit():
        return _proc_start_time(int(owner["pid"])) == owner.get("starttime")
    m = re.match(rf"{re.escape(prefix)}(\d+)-", name)
    if m:
        return _proc_start_time(int(m.group(1))) is not None
    return None


def _is_stale(owner: dict[str, str] | None, name: str, prefix: str, force: bool) -> bool:
    return force or _owner_alive(owner, name, prefix) is False


class TestVM:
    """A started throwaway domain on private copies of the guest images.

    ``boot_disk``/``data_disk`` default to the built images; pass other image paths (e.g. a
    restored disk) to boot those instead (they are copied too unless ``copy=False``), or
    ``data_disk=False`` for no data disk. ``overlay=True`` uses qcow2 overlays on the
    sources instead of full copies; ``raw=True`` converts the copies to raw.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        name: str | None = None,
        *,
        boot_disk: str | Path | None = None,
        data_disk: str | Path | bool | None = None,
        copy: bool = True,
        overlay: bool = False,
        raw: bool = False,
        agent: bool = True,
        memory_mib: int = 192,
        writer_rate: int | None = None,
        network: str | None = None,
        start: bool = True,
        images: GuestImages | None = None,
    ) -> None:
        self.name = name or f"{DEFAULT_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.images = images or ensure_built()
        self.dir = self.images.vms_dir / self.name
        self.console_log = self.dir / "console.log"
        self.raw = raw
        self.agent = agent
        self._src_boot = Path(boot_disk) if boot_disk else self.images.boot_disk
        if data_disk is False:
            self._src_data: Path | None = None
        elif data_disk is None or data_disk is True:
            self._src_data = self.images.data_disk
        else:
            self._src_data = Path(data_disk)
        self._copy, self._overlay = copy, overlay
        self._xml_opts: dict[str, Any] = {
            "memory_mib": memory_mib,
            "agent": agent,
            "raw": raw,
            "network": network,
            "writer_rate": writer_rate,
        }
        self._start = start
        self.conn: Any = None
        self.dom: Any = None
        self.boot_disk: Path = self._src_boot
        self.data_disk: Path | None = self._src_data
        self.xml = ""
        self.started_at = 0.0
        self._own_dir = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> TestVM:
        try:
            self.create()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def create(self) -> None:
        """Copy disks, define the domain and (unless start=False) start it."""
        self.dir.mkdir(parents=True, exist_ok=False)  # never adopt someone else's dir
        self._own_dir = True
        os.chmod(self.dir, 0o755)
        (self.dir / OWNER_FILE).write_text(json.dumps(_owner()))
        if self._copy:
            self.boot_disk = self._prepare(self._src_boot, "boot")
            if self._src_data is not None:
                self.data_disk = self._prepare(self._src_data, "data")
        self.xml = make_domain_xml(
            self.name,
            self.boot_disk,
            self.data_disk,
            console_log=self.console_log,
            metadata=_owner(),
            **self._xml_opts,
        )
        self.conn = _libvirt().open(libvirt_uri())
        self.dom = self.conn.defineXML(self.xml)
        if self._start:
            self.start()

    def _prepare(self, src: Path, role: str) -> Path:
        src_fmt = _image_format(src)
        if self._overlay and not self.raw:
            dst = self.dir / f"{role}.qcow2"
            _run(
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(src.resolve()),
                "-F",
                src_fmt,
                str(dst),
            )
        else:
            dst = self.dir / f"{role}.{'raw' if self.raw else 'qcow2'}"
            if src_fmt == ("raw" if self.raw else "qcow2"):
                _run("cp", "--sparse=always", str(src), str(dst))
            else:
                _run(
                    "qemu-img",
                    "convert",
                    "-q",
                    "-f",
                    src_fmt,
                    "-O",
                    "raw" if self.raw else "qcow2",
                    str(src),
                    str(dst),
                )
        os.chmod(dst, 0o644)
        return dst

    def start(self) -> None:
        """(Re)start the defined domain; the console log starts afresh."""
        self.started_at = time.monotonic()
        self.dom.create()

    def stop(self, *, graceful: bool = False, timeout: float = 30.0) -> None:
        """Power off: hard (virDomainDestroy, like a crash) or ACPI shutdown, then destroy."""
        if not self.is_active():
            return
        if graceful:
            try:
                self.dom.shutdown()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self.is_active():
                    time.sleep(0.2)
            except _libvirt().libvirtError:
                pass
        if self.is_active():
            self.dom.destroy()

    def is_active(self) -> bool:
        return bool(self.dom is not None and self.dom.isActive())

    def cleanup(self) -> None:
        """Destroy + undefine (with checkpoint/snapshot/NVRAM metadata) + delete files."""
        try:
            if self.dom is not None:
                _remove_domain(self.dom)
        finally:
            self.dom = None
            if self.conn is not None:
                try:
                    self.conn.close()
                except Exception:
                    pass
                self.conn = None
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- console ---------------------------------------------------------------------------
    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, after: int = 0
    ) -> re.Match[str]:
        """Wait until ``pattern`` matches the console log (from offset ``after``)."""
        rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console_text(), after)
            if m:
                return m
            if time.monotonic() >= deadline:
                tail = self.console_text()[-2000:]
                raise TimeoutError(
                    f"{self.name}: no {rx.pattern!r} within {timeout}s; console tail:\n{tail}"
                )
            if self.dom is not None and not self.dom.isActive():
                raise RuntimeError(
                    f"{self.name}: domain stopped while waiting for "
                    f"{rx.pattern!r}; console:\n{self.console_text()[-2000:]}"
                )
            time.sleep(0.2)

    def wait_heartbeat(self, timeout: float = 60.0, *, count: int = 1) -> float:
        """Wait for heartbeat number >= ``count``; return seconds since start()."""
        deadline = time.monotonic() + timeout
        while True:
            beats = self.heartbeats()
            if beats and beats[-1][0] >= count:
                return time.monotonic() - self.started_at
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: no heartbeat {count} within {timeout}s; "
                    f"console tail:\n{self.console_text()[-2000:]}"
                )
            if not self.is_active():
                raise RuntimeError(
                    f"{self.name}: domain stopped before heartbeat {count}; "
                    f"console tail:\n{self.console_text()[-2000:]}"
                )
            time.sleep(0.2)

    def heartbeats(self) -> list[tuple[int, float]]:
        """All (n, uptime) heartbeats in the console log so far."""
        return [(int(n), float(up)) for n, up in HEARTBEAT_RE.findall(self.console_text())]

    def writer_seq(self) -> int | None:
        """Last ``VMDR-WRITER seq=<n>`` reported on the console, if any."""
        found = re.findall(rf"{L.WRITER_MARKER} seq=(\d+)", self.console_text())
        return int(found[-1]) if found else None

    # -- guest agent -----------------------------------------------------------------------
    def agent_command(self, command: dict[str, Any], timeout: int = 10) -> Any:
        """Run a guest-agent command; returns the "return" member."""
        import libvirt_qemu

        reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(command), timeout, 0)
        return json.loads(reply).get("return")

    def agent_ping(self, timeout: float = 30.0) -> None:
        """guest-ping, retried until the agent answers or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent_command({"execute": "guest-ping"}, timeout=5)
                return
            except _libvirt().libvirtError as e:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.name}: guest agent not answering: {e}") from e
            time.sleep(0.5)


# -- helpers ---------------------------------------------------------------------------------
def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")


def _image_format(path: Path) -> str:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return str(json.loads(out)["format"])


def _undefine_flags() -> int:
    lv = _libvirt()
    flags = 0
    for name in (
        "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
        "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
        "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
        "VIR_DOMAIN_UNDEFINE_NVRAM",
    ):
        flags |= int(getattr(lv, name, 0))
    return flags


def _remove_domain(dom: Any) -> None:
    lv = _libvirt()
    try:
        if dom.isActive():
            dom.destroy()
    except lv.libvirtError:
        pass
    try:
        dom.undefineFlags(_undefine_flags())
    except lv.libvirtError as e:
        if e.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
            dom.undefine()


def _domain_owner(dom: Any) -> dict[str, str] | None:
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except Exception:
        return None
    el = root.find(f"metadata/{{{METADATA_NS}}}owner")
    return dict(el.attrib) if el is not None else None


def cleanup_stale(
    prefix: str = DEFAULT_PREFIX, *, force: bool = False, out_dir: Path | None = None
) -> list[str]:
    """Remove leftover test domains and their files; returns the removed names.

    Only domains whose creating process is known to be gone are removed, so concurrent
    test runs are safe: the owner is the pid + start time recorded in the domain metadata
    (TestVM) or else the pid in a name ``<prefix><pid>-...``; domains with neither are
    left alone. ``force=True`` removes every domain whose name starts with ``prefix``.
    """
    lv = _libvirt()
    vms_dir = (out_dir or images_dir()) / "vms"
    removed: list[str] = []
    conn = lv.open(libvirt_uri())
    try:
        for dom in conn.listAllDomains(0):
            name = dom.name()
            if not name.startswith(prefix):
                continue
            if not _is_stale(_domain_owner(dom), name, prefix, force):
                continue
            _remove_domain(dom)
            shutil.rmtree(vms_dir / name, ignore_errors=True)
            removed.append(name)
        live = {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()
    if vms_dir.is_dir():
        for d in vms_dir.iterdir():
            if not d.name.startswith(prefix) or d.name in live:
                continue
            try:
                owner = json.loads((d / OWNER_FILE).read_text())
            except (OSError, ValueError):
                owner = None
            if _is_stale(owner, d.name, prefix, force):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
    return removed


def ensure_isolated_network(name: str = "vmdr-test-isolated", bridge: str = "vmdrtest0") -> str:
    """Define + start an isolated libvirt network (no forward, no IP/DHCP); return name."""
    lv = _libvirt()
    conn = lv.open(libvirt_uri())
    try:
        try:
            net = conn.networkLookupByName(name)
        except lv.libvirtError:
            net = conn.networkDefineXML(
                f"<network><name>{name}</name><bridge name='{bridge}' stp='off'/></network>"
            )
        if not net.isActive():
            net.create()
    finally:
        conn.close()
    return name
