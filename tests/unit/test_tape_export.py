"""``vmdr export``: a snapshot as raw, qcow2 or tar, to a file or a pipe."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.unit.repofixtures import make_image, make_repo
from vmdr.errors import UsageError
from vmdr.jobs.export import export_snapshot
from vmdr.jobs.image import backup_image


def test_export_formats(tmp_path: Path) -> None:
    repo = make_repo(str(tmp_path / "repo"))
    content = make_image(str(tmp_path / "d.img"), 2 << 20, seed=3)
    backup_image(repo, str(tmp_path / "d.img"), "web")
    snap = repo.resolve("web")
    # raw to a pipe: holes as zeros, byte for byte
    buf = io.BytesIO()
    export_snapshot(repo, snap, "raw", "-", buf)
    assert buf.getvalue() == content
    # raw and qcow2 to files
    export_snapshot(repo, snap, "raw", str(tmp_path / "out.raw"), None)
    assert (tmp_path / "out.raw").read_bytes() == content
    export_snapshot(repo, snap, "qcow2", str(tmp_path / "out.qcow2"), None)
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                        str(tmp_path / "out.raw"), str(tmp_path / "out.qcow2")],
                       capture_output=True, check=False)
    assert p.returncode == 0, p.stdout
    # tar: summary and the disk
    export_snapshot(repo, snap, "tar", str(tmp_path / "out.tar"), None)
    with tarfile.open(tmp_path / "out.tar") as tf:
        assert tf.getnames() == ["snapshot.json", f"disks/{snap.disks[0].name}.raw"]
        member = tf.extractfile(f"disks/{snap.disks[0].name}.raw")
        assert member is not None and member.read() == content
    # bad input: qcow2 to a pipe, an existing file
    with pytest.raises(UsageError, match="pipe"):
        export_snapshot(repo, snap, "qcow2", "-", io.BytesIO())
    with pytest.raises(UsageError, match="exists"):
        export_snapshot(repo, snap, "tar", str(tmp_path / "out.tar"), None)
