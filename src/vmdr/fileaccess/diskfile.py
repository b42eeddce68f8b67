"""An NBD export as a read-only file, through ``nbdfuse`` (Debian package libnbd-bin)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from types import TracebackType

from vmdr.errors import VmdrError

START_TIMEOUT = 30.0


class DiskFile:
    """``nbdfuse -r`` in a private directory: ``path`` reads the export's bytes.

    A context manager; :meth:`close` unmounts the FUSE filesystem and ends nbdfuse.
    """

    def __init__(self, uri: str, workdir: str, name: str = "disk") -> None:
        self.uri = uri
        self.dir = os.path.join(workdir, "fuse")
        self.path = os.path.join(self.dir, name)
        self._log = os.path.join(workdir, "nbdfuse.log")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DiskFile:
        self.open()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def open(self) -> str:
        if shutil.which("nbdfuse") is None:
            raise VmdrError("nbdfuse is not installed (Debian: apt install libnbd-bin fuse3)")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                ["nbdfuse", "-r", self.path, self.uri], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.path):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                msg = self._last_line()
                self.close()
                raise VmdrError(f"cannot expose the disk through nbdfuse: {msg}")
            time.sleep(0.05)
        return self.path

    def _last_line(self) -> str:
        try:
            with open(self._log, encoding="utf-8", errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except FileNotFoundError:
            lines = []
        return lines[-1][:300] if lines else "it did not start"

    def close(self) -> None:
        """Unmount and stop nbdfuse (idempotent)."""
        unmount_fuse(self.dir)
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


def unmount_fuse(directory: str) -> None:
    """Unmount a FUSE mount if ``directory`` is one (no error if it is not)."""
    if not os.path.ismount(directory):
        return
    tool = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    p = subprocess.run([*tool, directory], capture_output=True, check=False)
    if p.returncode != 0:
        subprocess.run(["umount", "-l", directory], capture_output=True, check=False)
