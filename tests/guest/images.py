"""Mount-free assembly of the boot and data disks (layout: tests/guest/layout.py).

Tools: sfdisk (fdisk), mkfs.vfat (dosfstools), syslinux + mcopy (syslinux, mtools),
mke2fs -d (e2fsprogs), qemu-img (qemu-utils). Partition images are built as separate files
and spliced into the raw disk, which is then converted to qcow2.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.guest import layout as L

SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
SECTOR = 512
EXT4_UUID = "3d1c2f0e-5a6b-4c7d-8e9f-766d64727465"


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    full_env = {**os.environ, **(env or {})}
    r = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=full_env, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
        )


def _new_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _splice(src: Path, dst: Path, offset: int, chunk: int = 1024 * 1024) -> None:
    """Copy ``src`` into ``dst`` at ``offset``, skipping all-zero chunks (keeps sparsity)."""
    zero = bytes(chunk)
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        pos = 0
        while block := fi.read(chunk):
            if block != zero[: len(block)]:
                fo.seek(offset + pos)
                fo.write(block)
            pos += len(block)


def _partition(disk: Path, script: str) -> None:
    r = subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"sfdisk {disk} failed:\n{r.stdout}{r.stderr}")


def _write_mbr_code(raw: Path) -> None:
    """syslinux mbr.bin boot code (boots the active partition); table + signature kept."""
    with open(raw, "r+b") as f:
        f.write(SYSLINUX_MBR.read_bytes()[:440])


def _to_qcow2(raw: Path, out: Path) -> None:
    _run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, out)


def syslinux_cfg(cmdline: str) -> str:
    return (
        "DEFAULT vmdr\nPROMPT 0\nTIMEOUT 0\nSERIAL 0 115200\n"
        f"LABEL vmdr\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND {cmdline}\n"
    )


def build_boot_disk(vmlinuz: Path, initrd: Path, cmdline: str, work: Path, out: Path) -> None:
    """MBR (syslinux mbr.bin) + bootable FAT16 partition with syslinux, kernel, initrd."""
    fat = work / "bootpart.img"
    fat.unlink(missing_ok=True)
    start_lba = L.BOOT_PART_START // SECTOR
    # -h: hidden sectors = partition offset, so the VBR finds itself when chain-loaded.
    _run(
        "mkfs.vfat",
        "-C",
        "-F",
        "16",
        "-n",
        L.BOOT_FS_LABEL,
        "-i",
        "564d4452",
        "-h",
        str(start_lba),
        fat,
        str(L.BOOT_PART_SIZE // 1024),
    )
    mtools_env = {"MTOOLS_SKIP_CHECK": "1"}
    _run("syslinux", "--install", fat, env=mtools_env)
    cfg = work / "syslinux.cfg"
    cfg.write_text(syslinux_cfg(cmdline))
    _run("mcopy", "-o", "-i", fat, vmlinuz, "::/vmlinuz", env=mtools_env)
    _run("mcopy", "-o", "-i", fat, initrd, "::/initrd.img", env=mtools_env)
    _run("mcopy", "-o", "-i", fat, cfg, "::/syslinux.cfg", env=mtools_env)

    raw = work / "boot.raw"
    _new_sparse(raw, L.BOOT_DISK_SIZE)
    _partition(
        raw,
        "label: dos\nlabel-id: 0x564d4452\nunit: sectors\n"
        f"start={start_lba}, size={L.BOOT_PART_SIZE // SECTOR}, type=e, bootable\n",
    )
    _write_mbr_code(raw)
    _splice(fat, raw, L.BOOT_PART_START)
    _to_qcow2(raw, out)
    raw.unlink()
    fat.unlink()


def random_bytes(path: str, size: int) -> bytes:
    """Deterministic pseudo-random content of the data-disk file ``path``."""
    return hashlib.shake_256(f"vmdr-test-estate:{path}".encode()).digest(size)


def data_files() -> dict[str, bytes]:
    files = {L.HELLO_PATH: L.HELLO_TEXT.encode()}
    for path, size in L.RANDOM_FILES:
        files[path] = random_bytes(path, size)
    return files


def build_data_disk(work: Path, out: Path) -> list[dict[str, object]]:
    """ext4 (p1, populated with mke2fs -d) + raw records area (p2). Returns the file list."""
    staging = work / "datafs"
    manifest: list[dict[str, object]] = []
    for rel, content in sorted(data_files().items()):
        p = staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        os.utime(p, (1_700_000_000, 1_700_000_000))
        manifest.append(
            {"path": rel, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        )
    fs = work / "datafs.img"
    _new_sparse(fs, L.DATA_FS_SIZE)
    _run(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-L",
        L.DATA_FS_LABEL,
        "-U",
        EXT4_UUID,
        "-m",
        "0",
        "-E",
        f"root_owner=0:0,hash_seed={EXT4_UUID}",
        "-d",
        staging,
        fs,
        env={"E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    _run("e2fsck", "-fn", fs)

    raw = work / "data.raw"
    _new_sparse(raw, L.DATA_DISK_SIZE)
    _partition(
        raw,
        "label: dos\nlabel-id: 0x564d4453\nunit: sectors\n"
        f"start={L.DATA_FS_START // SECTOR}, size={L.DATA_FS_SIZE // SECTOR}, "
        "type=83\n"
        f"start={L.RECORDS_START // SECTOR}, size={L.RECORDS_SIZE // SECTOR}, "
        f"type={L.RECORDS_PART_TYPE:x}\n",
    )
    _write_mbr_code(raw)  # no active partition: "Missing operating system", not garbage
    _splice(fs, raw, L.DATA_FS_START)
    _to_qcow2(raw, out)
    raw.unlink()
    fs.unlink()
    return manifest
