"""Build the vmdr test guest images (boot disk, data disk, manifest) from Debian packages.

usage: python tests/guest/build.py [--out DIR] [--force]

Idempotent: the outputs are keyed by a hash over every input (host kernel, modules, busybox,
qemu-ga and its libraries, syslinux files, tool versions, the guest sources in tests/guest).
If ``DIR/manifest.json`` carries the same hash, nothing is rebuilt. Builds are serialised
with a lock file and written to a temp dir first, then renamed into place.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make "tests.guest" importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.guest import images, initramfs
from tests.guest import layout as L

DEFAULT_OUT = Path("/var/lib/libvirt/images/vmdr-test")
HERE = Path(__file__).resolve().parent
WRITER_SRC = HERE / "writer" / "vmdr-writer.c"
BUILD_FORMAT = 1
KERNEL_CMDLINE = (
    f"console=tty0 console=ttyS0,115200 quiet mitigations=off vmdr.rate={L.DEFAULT_WRITER_RATE}"
)

# sources whose change must rebuild the images (rootfs/ files are hashed as guest files)
BUILD_SOURCES = ("build.py", "layout.py", "images.py", "initramfs.py", "cpio.py")

BOOT_DISK = "boot.qcow2"
DATA_DISK = "data.qcow2"
MANIFEST = "manifest.json"

# tool or file -> Debian package that provides it
REQUIRED_TOOLS = {
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "syslinux": "syslinux",
    "mcopy": "mtools",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "gcc": "gcc",
    "ldd": "libc-bin",
}
REQUIRED_FILES = {
    str(images.SYSLINUX_MBR): "syslinux-common",
    "/usr/lib/x86_64-linux-gnu/libc.a": "libc6-dev",
    str(initramfs.BUSYBOX): "busybox-static",
    str(initramfs.QEMU_GA): "qemu-guest-agent",
}


def check_prerequisites() -> None:
    missing = {pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None}
    missing |= {pkg for path, pkg in REQUIRED_FILES.items() if not Path(path).exists()}
    if missing:
        raise initramfs.MissingInput(
            "missing Debian packages: "
            + " ".join(sorted(missing))
            + f" (apt-get install {' '.join(sorted(missing))})"
        )


def _tool_versions() -> str:
    cmds = (
        ["gcc", "-dumpfullversion"],
        ["mke2fs", "-V"],
        ["syslinux", "--version"],
        ["qemu-img", "--version"],
    )
    out = []
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        out.append(f"{cmd[0]}: {(r.stdout + r.stderr).strip()}")
    return "\n".join(out)


def input_hash(inputs: initramfs.InitramfsInputs, writer_binary: Path) -> str:
    """sha256 over everything that influences the images."""
    h = hashlib.sha256(f"vmdr-test-guest format={BUILD_FORMAT}\n{KERNEL_CMDLINE}\n".encode())
    h.update(_tool_versions().encode())

    def add(label: str, path: Path) -> None:
        h.update(f"\0{label}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)

    add("vmlinuz", inputs.kernel.vmlinuz)
    for rel in inputs.modules:
        add(f"module:{rel}", inputs.kernel.moddir / rel)
    for guest, host in sorted(inputs.files.items()):
        if host != writer_binary:
            add(f"file:{guest}", host)
    add("libc.a", Path("/usr/lib/x86_64-linux-gnu/libc.a"))
    for path in [*(HERE / f for f in BUILD_SOURCES), WRITER_SRC, images.SYSLINUX_MBR]:
        add(f"src:{path.name}", path)
    for name in ("ldlinux.sys", "ldlinux.c32"):  # syslinux embeds these; track its binary
        add(name, Path(shutil.which("syslinux") or "/usr/bin/syslinux"))
    return h.hexdigest()


def compile_writer(out: Path) -> None:
    r = subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(WRITER_SRC)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"compiling {WRITER_SRC} failed:\n{r.stderr}")


def load_manifest(out_dir: Path) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if all((out_dir / str(data.get(k, ""))).is_file() for k in ("boot_disk", "data_disk")):
        return data
    return None


def ensure(
    out_dir: Path = DEFAULT_OUT, *, force: bool = False, verbose: bool = False
) -> dict[str, object]:
    """Build the images into ``out_dir`` unless up to date; return the manifest."""
    check_prerequisites()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o755)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            work = Path(tmp)
            writer = work / "vmdr-writer"
            inputs = initramfs.gather(writer)
            digest = input_hash(inputs, writer)
            current = load_manifest(out_dir)
            if not force and current is not None and current.get("input_hash") == digest:
                if verbose:
                    print(f"up to date: {out_dir} ({digest[:12]})")
                return current
            t0 = time.monotonic()
            compile_writer(writer)
            initrd = work / "initrd.img"
            initramfs.build(inputs, initrd)
            images.build_boot_disk(
                inputs.kernel.vmlinuz, initrd, KERNEL_CMDLINE, work, work / BOOT_DISK
            )
            files = images.build_data_disk(work, work / DATA_DISK)
            manifest = _manifest(digest, inputs, files, initrd)
            for name in (BOOT_DISK, DATA_DISK):
                os.chmod(work / name, 0o644)
                os.replace(work / name, out_dir / name)
            tmp_manifest = work / MANIFEST
            tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
            os.chmod(tmp_manifest, 0o644)
            os.replace(tmp_manifest, out_dir / MANIFEST)
            if verbose:
                print(f"built {out_dir} in {time.monotonic() - t0:.1f}s ({digest[:12]})")
            return manifest


def _manifest(
    digest: str, inputs: initramfs.InitramfsInputs, files: list[dict[str, object]], initrd: Path
) -> dict[str, object]:
    return {
        "format": BUILD_FORMAT,
        "input_hash": digest,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "boot_disk": BOOT_DISK,
        "data_disk": DATA_DISK,
        "kernel_version": inputs.kernel.version,
        "kernel_cmdline": KERNEL_CMDLINE,
        "initrd_size": initrd.stat().st_size,
        "modules": inputs.modules,
        "boot_partition": {
            "start": L.BOOT_PART_START,
            "size": L.BOOT_PART_SIZE,
            "fs": "vfat",
            "label": L.BOOT_FS_LABEL,
        },
        "data_partition": {
            "start": L.DATA_FS_START,
            "size": L.DATA_FS_SIZE,
            "fs": "ext4",
            "label": L.DATA_FS_LABEL,
            "uuid": images.EXT4_UUID,
            "number": 1,
        },
        "records_area": {
            "start": L.RECORDS_START,
            "size": L.RECORDS_SIZE,
            "number": 2,
            "record_size": L.RECORD_SIZE,
            "nslots": L.RECORDS_NSLOTS,
            "default_rate": L.DEFAULT_WRITER_RATE,
        },
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    try:
        ensure(args.out, force=args.force, verbose=True)
    except initramfs.MissingInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
