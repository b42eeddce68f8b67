"""The replica's framed stream over ssh (issue 11): each changed piece one frame, zstd when
that makes it smaller, raw otherwise; the helper at the target applies the frames and
acknowledges only after a clean end. The framing alone, then the helper for real against
a local ``qemu-nbd`` (a local site told to stream, as a ``qemu+ssh://`` one does)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from vmdr.errors import HypervisorError
from vmdr.jobs import replica_frames as rf
from vmdr.jobs.replicate_site import Site

MIB = 1 << 20
Z = zstandard.ZstdCompressor(level=rf.LEVEL).compress


class _Disks:
    def __init__(self) -> None:
        self.ops: list[tuple[str, int, int, bytes | int]] = []

    def write(self, d: int, off: int, data: bytes) -> None:
        self.ops.append(("w", d, off, data))

    def zero(self, d: int, off: int, ln: int) -> None:
        self.ops.append(("z", d, off, ln))


def _stream(rand: bytes) -> bytes:
    return b"".join([rf.data_frame(0, 0, b"ab" * MIB, Z), rf.data_frame(1, 4 * MIB, rand, Z),
                     rf.frame(rf.ZERO, 0, 8 * MIB, MIB), rf.frame(rf.END, 0, 0, 0)])


def test_round_trip_with_the_raw_and_zstd_flags() -> None:
    rand = os.urandom(MIB)
    small = rf.data_frame(0, 0, b"ab" * MIB, Z)
    assert small[2] == rf.ZSTD and len(small) < 1000  # compressible: zstd
    assert rf.data_frame(0, 0, rand, Z)[2] == rf.RAW  # zstd's output >= input: raw
    assert rf.data_frame(0, 0, b"ab" * 8, None)[2] == rf.RAW  # --no-compress
    disks = _Disks()
    assert rf.apply(io.BytesIO(_stream(rand)), disks.write, disks.zero, 2,
                    rf.decompressor()) == (3, 3 * MIB)
    assert disks.ops == [("w", 0, 0, b"ab" * MIB), ("w", 1, 4 * MIB, rand),
                         ("z", 0, 8 * MIB, MIB)]


@pytest.mark.parametrize("cut", [0, 5, rf.HEADER.size + 10, -rf.HEADER.size, -3])
def test_a_truncated_stream_is_one_line_and_never_ends_cleanly(cut: int) -> None:
    data = _stream(os.urandom(MIB))[:cut]
    with pytest.raises(rf.FrameError) as e:
        rf.apply(io.BytesIO(data), _Disks().write, _Disks().zero, 2, rf.decompressor())
    assert "\n" not in str(e.value) and "ended" in str(e.value)


def test_corrupt_frames() -> None:
    good = rf.data_frame(0, 0, b"ab" * MIB, Z)
    bad_z = good[:rf.HEADER.size] + b"\x00" * (len(good) - rf.HEADER.size)
    cases = {b"XX" + good[2:]: "bad magic", bad_z: "does not decompress",
             rf.frame(9, 0, 0, 0): "unknown kind", rf.frame(rf.RAW, 5, 0, 1, b"x"): "range",
             rf.frame(rf.RAW, 0, 0, 2, b"x"): "1 bytes, not 2",
             good: "zstandard is missing"}
    for data, what in cases.items():
        dec = None if what == "zstandard is missing" else rf.decompressor()
        with pytest.raises(rf.FrameError, match=what):
            rf.apply(io.BytesIO(data + rf.frame(rf.END, 0, 0, 0)), _Disks().write,
                     _Disks().zero, 2, dec)


needs_qemu = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-nbd")),
                                reason="qemu-img / qemu-nbd not installed")


def _read(img: Path, off: int, ln: int) -> bytes:
    raw = img.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(off)
        return f.read(ln)


@needs_qemu
@pytest.mark.parametrize("zstd", [True, False])
def test_the_helper_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             zstd: bool) -> None:
    # the helper's Python: the distribution's (libnbd and zstandard), or one without zstd
    monkeypatch.setenv("VMDR_REPLICA_PYTHON", "/usr/bin/python3" if zstd else str(tmp_path / "py"))
    if not zstd:
        (tmp_path / "py").write_text('#!/bin/sh\nexec /usr/bin/python3 -c "import sys; '
                                    'sys.modules[\'zstandard\'] = None; '
                                    'src = sys.argv[2]; sys.argv = sys.argv[2:]; exec(src)" "$@"\n')
        (tmp_path / "py").chmod(0o755)
    site = Site("qemu:///system", stream=True)
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    rand = os.urandom(MIB)
    ex = site.serve(None, [(str(a), 16 * MIB, True), (str(b), 16 * MIB, True)])
    assert ex.stream is not None
    ex.writers[str(a)].write(MIB, b"\x07" * MIB)
    ex.writers[str(b)].write(2 * MIB, rand)
    ex.close()
    sent = ex.stream.sent
    assert (sent < 1.1 * MIB) if zstd else (sent > 2 * MIB)
    assert _read(a, MIB, MIB) == b"\x07" * MIB and _read(b, 2 * MIB, MIB) == rand
    # a corrupt frame: one line, no ok, the cycle fails
    ex = site.serve(None, [(str(a), None, True)])
    assert ex.stream is not None
    ex.stream.send(rf.frame(rf.RAW, 0, 0, 10, b"short"))
    what = r"replica stream: corrupt frame 1 .*5 bytes, not 10"
    with pytest.raises(HypervisorError, match=what) as e:
        ex.close()
    assert "\n" not in e.value.message
