"""Fixed layout of the vmdr test guest: disks, partitions, record format, console markers.

Everything the build script, the checker and the tests must agree on lives here.

Boot disk (``boot.qcow2``, virtual size ``BOOT_DISK_SIZE``)::

    sector 0          syslinux MBR code (mbr.bin) + MBR partition table
    p1 @ 1 MiB        FAT16, bootable, label VMDRBOOT: ldlinux.sys/.c32, syslinux.cfg,
                      vmlinuz (Debian kernel), initrd.img (gzip cpio, see initramfs.py)

Zeroing the first MiB removes MBR code and partition table: the disk no longer boots.

Data disk (``data.qcow2``, virtual size ``DATA_DISK_SIZE``)::

    p1 @ 1 MiB        ext4, label vmdr-data, size DATA_FS_SIZE; mounted at /data in the guest.
                      Contains hello.txt and a few pseudo-random files, listed with sha256
                      in manifest.json next to the images.
    p2 (rest)         MBR type 0xda, raw "records area" written by vmdr-writer.

Records area: an array of ``RECORD_SIZE`` slots. Record with sequence number ``seq`` lives in
slot ``seq % nslots`` (the writer wraps around and keeps counting). Little-endian layout::

    0    8s   magic  b"VMDRREC1"
    8    u64  seq
    16   u64  time_ns      CLOCK_REALTIME when written (informational)
    24   u32  nslots       number of slots in the area (must match the area size)
    28   u32  session      random per writer start (informational)
    32   ...  payload      PAYLOAD_WORDS x u64, every word == seq ^ PAYLOAD_XOR
    4088 u32  reserved     0
    4092 u32  crc32        zlib/IEEE CRC-32 of bytes 0..4091

Console markers (serial console, one line each)::

    VMDR-BOOTED uptime=<s> data=<dev|none> records=<dev|none> agent=<dev|none> rate=<n>
    VMDR-HEARTBEAT <n> <uptime>     every second; n counts from 1, uptime = /proc/uptime[0]
    VMDR-WRITER start seq=<next> slots=<nslots> rate=<r> dev=<dev>
    VMDR-WRITER seq=<last written seq>   about every 2 s while writing
"""

from __future__ import annotations

import struct

MIB = 1024 * 1024

BOOT_DISK_SIZE = 64 * MIB
BOOT_PART_START = 1 * MIB
BOOT_PART_SIZE = BOOT_DISK_SIZE - 2 * MIB
BOOT_FS_LABEL = "VMDRBOOT"

DATA_DISK_SIZE = 256 * MIB
DATA_FS_START = 1 * MIB
DATA_FS_SIZE = 64 * MIB
DATA_FS_LABEL = "vmdr-data"
RECORDS_START = DATA_FS_START + DATA_FS_SIZE
RECORDS_SIZE = DATA_DISK_SIZE - RECORDS_START
RECORDS_PART_TYPE = 0xDA

RECORD_SIZE = 4096
RECORD_MAGIC = b"VMDRREC1"
RECORD_HEADER = struct.Struct("<8sQQII")
PAYLOAD_OFFSET = RECORD_HEADER.size  # 32
PAYLOAD_WORDS = (RECORD_SIZE - 8 - PAYLOAD_OFFSET) // 8  # 507
PAYLOAD_XOR = 0xA5A5_A5A5_5A5A_5A5A
CRC_OFFSET = RECORD_SIZE - 4
RECORDS_NSLOTS = RECORDS_SIZE // RECORD_SIZE

DEFAULT_WRITER_RATE = 50  # records/s, baked into the kernel command line
FW_CFG_RATE_NAME = "opt/org.vmdr/rate"  # libvirt <sysinfo type='fwcfg'> override
DATA_RATE_FILE = "vmdr/rate"  # override file on the data filesystem (relative to /data)

AGENT_CHANNEL = "org.qemu.guest_agent.0"

BOOTED_MARKER = "VMDR-BOOTED"
HEARTBEAT_MARKER = "VMDR-HEARTBEAT"
WRITER_MARKER = "VMDR-WRITER"

HELLO_PATH = "hello.txt"
HELLO_TEXT = "Hello from the vmdr test estate!\n"
# (path inside the data fs, size in bytes); content = deterministic pseudo-random bytes
RANDOM_FILES: tuple[tuple[str, int], ...] = (
    ("random/small.bin", 4096 + 123),
    ("random/medium.bin", 256 * 1024),
    ("random/nested/deeper/large.bin", 3 * MIB + 7),
)
