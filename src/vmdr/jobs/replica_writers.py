"""The writing end of a replica cycle at the DR host: the framed stream into the one
serving process there (:class:`FrameSender`), the NBD exports of one *serve*
(:class:`Exports`) and a writer per standby disk (:class:`DiskWriter` over NBD,
:class:`StreamWriter` through the stream). :class:`vmdr.jobs.replicate_site.Site` makes
them."""

from __future__ import annotations

import contextlib
import errno
import queue
import subprocess
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmdr.errors import HypervisorError, NoSpace, VmdrError
from vmdr.jobs import replica_frames

if TYPE_CHECKING:
    from vmdr.jobs.replicate_site import Site


def _last_line(data: bytes | None) -> str:
    lines = [ln.strip() for ln in (data or b"").decode(errors="replace").splitlines()
             if ln.strip()]
    return lines[-1] if lines else "no error output"



def _helper_source() -> str:
    from vmdr.jobs import replica_frames

    with open(replica_frames.__file__, encoding="utf-8") as f:
        return f.read()


class FrameSender:
    """The framed stream into the one serving process at the target (its stdin). A
    thread writes the frames into the pipe (to ssh) while the caller compresses the next
    piece: zstd's pass and ssh's encryption overlap."""

    def __init__(self, proc: subprocess.Popen[bytes], compress: bool) -> None:
        self.proc = proc
        self.sent = 0  # bytes on the wire (after zstd)
        self._z: Callable[[bytes], bytes] | None = None
        if compress:
            import zstandard

            self._z = zstandard.ZstdCompressor(level=replica_frames.LEVEL).compress
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=2)
        self._broken = False
        self._thread = threading.Thread(target=self._pump, name="vmdr-replica-send",
                                        daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdin is not None
        while (data := self._q.get()) is not None:
            if self._broken:
                continue  # drain: the caller sees the failure on its next send
            try:
                self.proc.stdin.write(data)
            except (OSError, ValueError):
                self._broken = True

    def send(self, data: bytes) -> None:
        if self._broken:
            raise self.failure()
        self._q.put(data)
        self.sent += len(data)

    def data(self, disk: int, offset: int, data: bytes) -> None:
        self.send(replica_frames.data_frame(disk, offset, data, self._z))

    def zero(self, disk: int, offset: int, length: int) -> None:
        self.send(replica_frames.frame(replica_frames.ZERO, disk, offset, length))

    def stop(self) -> None:
        """End the writing thread (after what is queued)."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def finish(self, where: str, *, keep_open: bool = False) -> None:
        """The end frame; then the helper's ``ok`` after it flushed every disk. With
        ``keep_open`` the process's input stays open (for the commit that follows)."""
        self.send(replica_frames.frame(replica_frames.END, 0, 0, 0))
        self.stop()
        if self._broken:
            raise self.failure(where)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if keep_open:
            with contextlib.suppress(OSError):
                self.proc.stdin.flush()
        else:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        line = self.proc.stdout.readline().decode(errors="replace").strip()
        if not line.startswith("ok "):
            raise self.failure(where)

    def failure(self, where: str = "the DR host") -> VmdrError:
        """The helper's one error line (it stopped: a corrupt stream, a full disk)."""
        if threading.current_thread() is not self._thread:
            self._broken = True
            self.stop()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        err = self.proc.stderr.read() if self.proc.stderr else b""
        what = _last_line(err)
        if "space" in what.lower():
            return NoSpace(f"no space left on {where} ({what})")
        return HypervisorError(f"writing the standby disks on {where}: {what}")


class Exports:
    """The NBD exports of one :meth:`Site.serve`: a writer per served image; closing
    flushes each and ends the one remote process serving them all."""

    def __init__(self, site: Site, proc: subprocess.Popen[bytes]) -> None:
        self.site, self.proc = site, proc
        self.writers: dict[str, DiskWriter] = {}
        self.stream: FrameSender | None = None

    def close(self, *, flush: bool = True) -> None:
        first: BaseException | None = None
        if self.stream is not None:
            done = False
            try:
                if flush:
                    self.stream.finish(self.site.where, keep_open=True)
                    done = True
            finally:
                self.stream._broken = True  # nothing more is written (a failed cycle)
                self.stream.stop()
                self.writers = {}
                if done:  # it waits for the cycle's commit (Site.commit)
                    self.site._pending = self.proc
                else:
                    self.site._stop(self.proc)
            return
        try:
            for w in self.writers.values():
                try:
                    w.close(flush=flush)
                except VmdrError as exc:
                    first = first or exc
        finally:
            self.writers = {}
            self.site._stop(self.proc)
        if first is not None:
            raise first


class DiskWriter:
    """Writes into one standby disk over NBD: data, zeroes, flush."""

    def __init__(self, sock: str, path: str, where: str, stop: Any) -> None:
        import nbd

        self.path, self.where = path, where
        self._stop = stop
        self._h = nbd.NBD()
        try:
            self._h.connect_unix(sock)
        except nbd.Error as exc:
            stop()
            raise HypervisorError(f"cannot reach the NBD export of {path} on {where}: "
                                  f"{exc.string}") from None
        self.size = int(self._h.get_size())

    def _fail(self, exc: Any) -> VmdrError:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "space" in str(exc).lower():
            return NoSpace(f"no space left on {self.where} writing {self.path}")
        return HypervisorError(f"writing {self.path} on {self.where}: {exc}")

    def write(self, offset: int, data: bytes) -> None:
        import nbd

        try:
            self._h.pwrite(data, offset)
        except nbd.Error as exc:
            raise self._fail(exc) from None

    def zero(self, offset: int, length: int) -> None:
        import nbd

        try:
            self._h.zero(length, offset)
        except nbd.Error as exc:
            raise self._fail(exc) from None

    def read(self, offset: int, length: int) -> bytes:
        import nbd

        try:
            return bytes(self._h.pread(length, offset))
        except nbd.Error as exc:
            raise HypervisorError(f"reading {self.path} on {self.where}: {exc}") from None

    def close(self, *, flush: bool = True) -> None:
        import nbd

        try:
            if flush:
                try:
                    self._h.flush()
                except nbd.Error as exc:
                    raise self._fail(exc) from None
            with contextlib.suppress(nbd.Error):
                self._h.shutdown()
        finally:
            self._stop()


class StreamWriter(DiskWriter):
    """A standby disk written through the framed stream (see :mod:`.replica_frames`)."""

    def __init__(self, sender: FrameSender, index: int, path: str, where: str) -> None:
        self.path, self.where = path, where
        self._sender, self._i = sender, index

    def write(self, offset: int, data: bytes) -> None:
        self._sender.data(self._i, offset, data)

    def zero(self, offset: int, length: int) -> None:
        self._sender.zero(self._i, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        raise HypervisorError(f"{self.path} on {self.where} is written, not read, here")

    def close(self, *, flush: bool = True) -> None:
        pass  # the stream ends once, for all its disks (Exports.close)
