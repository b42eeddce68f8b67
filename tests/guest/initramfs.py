"""Collect and assemble the initramfs of the vmdr test guest.

The guest runs entirely from its initramfs (no switch_root): busybox-static as init and
shell, the Debian kernel's virtio/ext4 modules, the real Debian ``qemu-ga`` with its shared
libraries and dynamic loader, the static ``vmdr-writer`` and the scripts in ``rootfs/``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest import cpio

HERE = Path(__file__).resolve().parent
ROOTFS_DIR = HERE / "rootfs"

# Loaded in this order (dependencies from modules.dep are inserted before each module).
# virtio_pci etc. are modules in the Debian kernel; crc32c_generic because crc32c-intel
# needs SSE4.2, which the default TCG CPU model lacks.
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "qemu_fw_cfg",
    "button",
    "evdev",
)

BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")


class MissingInput(RuntimeError):
    """A host file the guest needs is missing (names the Debian package to install)."""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    moddir: Path


@dataclass
class InitramfsInputs:
    kernel: Kernel
    modules: list[str]  # paths relative to kernel.moddir, in load order
    files: dict[str, Path] = field(default_factory=dict)  # guest path -> host file

    def host_files(self) -> list[Path]:
        return [self.kernel.moddir / m for m in self.modules] + list(self.files.values())


def _version_key(v: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", v)]


def find_kernel() -> Kernel:
    """Newest kernel with both /boot/vmlinuz-V and /lib/modules/V/modules.dep.

    Override with VMDR_GUEST_KERNEL=<version>.
    """
    wanted = os.environ.get("VMDR_GUEST_KERNEL")
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = Path("/lib/modules") / version
        if (moddir / "modules.dep").is_file() and (wanted is None or wanted == version):
            found.append(Kernel(version, vmlinuz, moddir))
    if not found:
        raise MissingInput(
            "no /boot/vmlinuz-V with /lib/modules/V: install Debian package linux-image-amd64"
        )
    return max(found, key=lambda k: _version_key(k.version))


def resolve_modules(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to moddir) for ``names`` plus dependencies, deps first.

    Names that are built into the kernel (modules.builtin) are skipped.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_modname(path)] = path
    builtin = {_modname(p) for p in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise MissingInput(f"kernel module {name} not found in {moddir}")
        visit(by_name[key])
    return order


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def shared_libs(binary: Path) -> dict[str, Path]:
    """guest path -> host file for every shared library and the loader ``binary`` needs."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line) or re.match(r"\s*(/\S+) \(0x", line)
        if not m:
            continue
        where = m.group(m.lastindex or 1)
        libs[where.lstrip("/")] = Path(where).resolve()
    if not any("ld-linux" in k for k in libs):
        raise RuntimeError(f"ldd {binary}: no dynamic loader found in:\n{out}")
    return libs


def gather(writer_binary: Path) -> InitramfsInputs:
    """Find every host input of the initramfs; raises MissingInput naming the package."""
    kernel = find_kernel()
    for path, pkg in ((BUSYBOX, "busybox-static"), (QEMU_GA, "qemu-guest-agent")):
        if not path.is_file():
            raise MissingInput(f"{path} missing: install Debian package {pkg}")
    if "not a dynamic" not in _ldd_text(BUSYBOX):
        raise MissingInput(f"{BUSYBOX} is not static: install Debian package busybox-static")
    files: dict[str, Path] = {
        "bin/busybox": BUSYBOX,
        "usr/sbin/qemu-ga": QEMU_GA,
        "bin/vmdr-writer": writer_binary,
    }
    files.update(shared_libs(QEMU_GA))
    for src in sorted(ROOTFS_DIR.rglob("*")):
        if src.is_file():
            files[str(src.relative_to(ROOTFS_DIR))] = src
    return InitramfsInputs(kernel, resolve_modules(kernel.moddir, MODULES), files)


def _ldd_text(binary: Path) -> str:
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    return r.stdout + r.stderr


def _read_module(path: Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def _busybox_applets() -> list[str]:
    out = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def build(inputs: InitramfsInputs, out: Path) -> None:
    """Write the gzip-compressed newc initramfs to ``out``."""
    entries: dict[str, cpio.Entry] = {}

    def add_dirs(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            entries.setdefault(d, cpio.directory(d))

    for d in ("dev", "proc", "sys", "run", "tmp", "data", "var/log", "root", "etc/vmdr"):
        add_dirs(d + "/")
    entries["dev/console"] = cpio.chardev("dev/console", 5, 1)
    entries["dev/null"] = cpio.chardev("dev/null", 1, 3, 0o666)
    for applet in _busybox_applets():
        add_dirs(applet)
        if applet != "bin/busybox":
            entries[applet] = cpio.symlink(applet, "/bin/busybox")
    entries["init"] = cpio.symlink("init", "/bin/busybox")
    for guest, host in sorted(inputs.files.items()):
        add_dirs(guest)
        mode = stat.S_IMODE(host.stat().st_mode) | 0o444
        entries[guest] = cpio.regular(guest, host.read_bytes(), mode)
    for rel in inputs.modules:
        name = rel.removesuffix(".xz").removesuffix(".zst")
        guest = f"lib/modules/{name}"
        add_dirs(guest)
        entries[guest] = cpio.regular(guest, _read_module(inputs.kernel.moddir / rel))
    load_order = "".join(
        rel.removesuffix(".xz").removesuffix(".zst") + "\n" for rel in inputs.modules
    )
    entries["etc/vmdr/modules"] = cpio.regular("etc/vmdr/modules", load_order.encode())
    ordered = sorted(entries.values(), key=lambda e: e.name)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        cpio.write_newc(gz, ordered)  # type: ignore[arg-type]
