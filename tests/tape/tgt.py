"""tgt as an emulated tape library on 127.0.0.1, and the LD_PRELOAD library that lets
real mtx, mt, sg3_utils and Python SG_IO reach it (see ../../../shared notes
tape-emulation.md and docs/operations.md "Tape: what was tested how").

``TgtLibrary`` starts its own ``tgtd`` on a private control port and iSCSI port, builds
tape images with ``tgtimg``, creates one target with LUN 1 a tape drive and LUN 2 a media
changer (8 storage slots at 1000, 2 import/export at 10, the drive at 500), and writes the
two "device files" (regular files holding an iscsi:// URL) the preload library turns into
SCSI devices. ``stop()`` removes the target and shuts tgtd down through tgtadm, because
tgtd ignores SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IQN = "iqn.2026-12.org.vmdr.test:vtl"
SLOTS, IE_SLOTS = 8, 2
SLOT_BASE, IE_BASE, DRIVE_ADDR, ARM_ADDR = 1000, 10, 500, 1


def tools_missing() -> list[str]:
    need = ["tgtd", "tgtadm", "tgtimg", "mtx", "mt", "gcc", "sg_raw"]
    missing = [t for t in need if shutil.which(t) is None]
    if not Path("/usr/include/iscsi/iscsi.h").exists():
        missing.append("libiscsi-dev")
    return missing


def build_preload(out_dir: Path) -> Path:
    """Compile the preload library (once per output directory)."""
    so = out_dir / "libvmdr_iscsi_preload.so"
    src = HERE / "iscsi_preload.c"
    if not so.exists() or so.stat().st_mtime < src.stat().st_mtime:
        out_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(so), str(src), "-liscsi",
                        "-ldl"], check=True, capture_output=True)
    return so


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TgtLibrary:
    def __init__(self, workdir: Path, tapes: list[str], tape_mb: int = 64) -> None:
        self.dir = workdir
        self.tapes = tapes
        self.tape_mb = tape_mb
        self.port = _free_port()
        self.cport = 2000 + os.getpid() % 20000  # tgtd's management channel (a unix socket)
        self.proc: subprocess.Popen[bytes] | None = None
        self.changer_dev = workdir / "changer.dev"
        self.drive_dev = workdir / "drive.dev"
        self.preload = build_preload(workdir / "lib")
        self.media = workdir / "media"

    # ------------------------------------------------------------------ helpers
    def adm(self, *args: str, check: bool = True) -> str:
        p = subprocess.run(["tgtadm", "-C", str(self.cport), "--lld", "iscsi", *args],
                           capture_output=True, text=True, check=False, timeout=30)
        if check and p.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def env(self) -> dict[str, str]:
        """The environment for a process that should see the devices."""
        return {**os.environ, "LD_PRELOAD": str(self.preload)}

    def changer_update(self, params: str) -> None:
        self.adm("--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", "2",
                 "--params", params)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> TgtLibrary:
        self.media.mkdir(parents=True, exist_ok=True)
        for bc in self.tapes:
            img = self.media / bc
            if not img.exists():
                kind = "clean" if bc.startswith("CLN") else "data"
                subprocess.run(["tgtimg", "--op=new", "--device-type=tape", f"--barcode={bc}",
                                f"--size={self.tape_mb}", f"--type={kind}",
                                f"--file={img}"], check=True, capture_output=True)
        notape = self.media / "notape"
        if not notape.exists():
            subprocess.run(["tgtimg", "--op=new", "--device-type=tape", "--barcode=",
                            "--size=1", "--type=clean", f"--file={notape}"], check=True,
                           capture_output=True)
        smc = self.dir / "smc"
        smc.write_bytes(bytes(1024))
        log = open(self.dir / "tgtd.log", "wb")  # noqa: SIM115 (kept for the daemon's life)
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.cport), "--iscsi",
             f"portal=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            p = subprocess.run(["tgtadm", "-C", str(self.cport), "--mode", "system", "--op",
                                "show"], capture_output=True, check=False)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("tgtd did not start: "
                                   + (self.dir / "tgtd.log").read_text(errors="replace"))
            time.sleep(0.1)
        self.adm("--mode", "target", "--op", "new", "--tid", "1", "-T", IQN)
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                 "-b", str(notape), "--device-type=tape")
        self.adm("--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "2",
                 "-b", str(smc), "--device-type=changer")
        self.changer_update(f"media_home={self.media}")
        self.changer_update(f"element_type=1,start_address={ARM_ADDR},quantity=1")
        self.changer_update(f"element_type=2,start_address={SLOT_BASE},quantity={SLOTS}")
        self.changer_update(f"element_type=3,start_address={IE_BASE},quantity={IE_SLOTS}")
        self.changer_update(f"element_type=4,start_address={DRIVE_ADDR},quantity=1")
        self.changer_update(f"element_type=4,address={DRIVE_ADDR},tid=1,lun=1")
        for i, bc in enumerate(self.tapes):
            self.changer_update(f"element_type=2,address={SLOT_BASE + i},barcode={bc},sides=1")
        self.adm("--mode", "target", "--op", "bind", "--tid", "1", "-I", "127.0.0.1")
        self.changer_dev.write_text(f"iscsi://127.0.0.1:{self.port}/{IQN}/2\n")
        self.drive_dev.write_text(f"iscsi://127.0.0.1:{self.port}/{IQN}/1\n")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.adm("--mode", "target", "--op", "delete", "--force", "--tid", "1", check=False)
            subprocess.run(["tgtadm", "-C", str(self.cport), "--mode", "system", "--op",
                            "delete"], capture_output=True, check=False, timeout=30)
            self.proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> TgtLibrary:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
