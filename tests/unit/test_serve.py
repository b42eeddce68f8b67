"""vmdr.serve without nbdkit or libvirt: the served-disk engine, PNG, sandbox XML, state."""

from __future__ import annotations

import itertools
import os
import random
import struct
import threading
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from vmdr.errors import ObjectNotFoundInRepo, UsageError
from vmdr.jobs.image import backup_image
from vmdr.repository.crypto import HOLE
from vmdr.repository.manifest import Snapshot
from vmdr.repository.repo import Repository, chunk_name
from vmdr.serve import repo_url, start_server
from vmdr.serve import sandbox as sb
from vmdr.serve.export import ServedDisk
from vmdr.serve.png import PNG_SIGNATURE, png_size, ppm_to_png
from vmdr.storage.registry import open_backend
from vmdr.storage.wrappers import wrap

from .repofixtures import SMALL_CHUNK, make_image, make_repo

SIZE = 40 * SMALL_CHUNK + 12345  # a short last chunk


@pytest.fixture
def served(tmp_path: Path) -> tuple[Repository, Snapshot, bytes]:
    repo = make_repo(str(tmp_path / "repo"))
    content = make_image(str(tmp_path / "img"), SIZE, seed=7)
    snap = backup_image(repo, str(tmp_path / "img"), "img", [], None, 2).snapshot
    return repo, snap, content


def test_random_reads_match_content(served: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, content = served
    disk = ServedDisk(repo, snap.disks[0], cache_chunks=4, readahead=2, workers=2)
    rng = random.Random(3)
    for _ in range(200):
        off = rng.randrange(0, SIZE)
        n = rng.randrange(1, min(SIZE - off, 3 * SMALL_CHUNK) + 1)
        assert disk.pread(off, n) == content[off : off + n]
    assert disk.pread(SIZE - 10, 10) == content[-10:]
    with pytest.raises(ValueError):
        disk.pread(SIZE - 10, 11)
    disk.close()


def test_concurrent_readers_share_the_cache(served: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, content = served
    disk = ServedDisk(repo, snap.disks[0], cache_chunks=64, readahead=0, workers=4)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(100):
                off = rng.randrange(0, SIZE - 5000)
                if disk.pread(off, 5000) != content[off : off + 5000]:
                    raise AssertionError(f"mismatch at {off}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data_chunks = sum(1 for c in snap.disks[0].chunks if c != HOLE)
    assert disk.fetched <= data_chunks  # every chunk decoded at most once
    disk.close()


def test_sequential_reads_prefetch_and_holes_are_free(
    served: tuple[Repository, Snapshot, bytes],
) -> None:
    repo, snap, _ = served
    chunks = snap.disks[0].chunks
    disk = ServedDisk(repo, snap.disks[0], cache_chunks=16, readahead=4, workers=2)
    disk.pread(0, SMALL_CHUNK)
    disk.pread(SMALL_CHUNK, SMALL_CHUNK)  # continues a stream: read-ahead starts
    for f in list(disk._cache.values()):
        f.result()
    ahead = [i for i in range(2, 6) if chunks[i] != HOLE]
    assert all(i in disk._cache for i in ahead)
    holes = [i for i, c in enumerate(chunks) if c == HOLE]
    assert holes, "fixture image should have hole chunks"
    before = disk.fetched
    h = holes[-1]
    assert disk.pread(h * SMALL_CHUNK, 100) == bytes(100)
    assert disk.fetched == before
    disk.close()


def test_extents_report_holes(served: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, content = served
    disk = ServedDisk(repo, snap.disks[0])
    ext = disk.extents(0, SIZE)
    assert ext[0].offset == 0 and sum(e.length for e in ext) == SIZE
    for a, b in itertools.pairwise(ext):
        assert a.offset + a.length == b.offset and a.hole != b.hole  # merged
    for e in ext:
        if e.hole:
            assert content[e.offset : e.offset + e.length] == bytes(e.length)
    mid = disk.extents(SMALL_CHUNK + 100, 10)
    assert mid[0].offset == SMALL_CHUNK + 100 and mid[0].length == SMALL_CHUNK - 100


def test_missing_chunk_raises_and_is_retried(served: tuple[Repository, Snapshot, bytes]) -> None:
    repo, snap, _ = served
    idx = next(i for i, c in enumerate(snap.disks[0].chunks) if c != HOLE)
    oid = snap.disks[0].chunks[idx]
    path = os.path.join(repo.backend.root, chunk_name(oid))  # type: ignore[attr-defined]
    blob = Path(path).read_bytes()
    os.unlink(path)
    disk = ServedDisk(repo, snap.disks[0], readahead=0)
    with pytest.raises(ObjectNotFoundInRepo):
        disk.pread(idx * SMALL_CHUNK, 10)
    Path(path).write_bytes(blob)
    assert len(disk.pread(idx * SMALL_CHUNK, 10)) == 10  # the failure was not cached


def test_ppm_to_png_roundtrip() -> None:
    w, h = 5, 3
    pixels = bytes(random.Random(1).randrange(256) for _ in range(w * h * 3))
    ppm = b"P6\n# a comment\n5 3\n255\n" + pixels
    png = ppm_to_png(ppm)
    assert png.startswith(PNG_SIGNATURE) and png_size(png) == (5, 3)
    idat_len = struct.unpack(">I", png[33:37])[0]
    raw = zlib.decompress(png[41 : 41 + idat_len])
    rows = [raw[y * (1 + w * 3) + 1 : (y + 1) * (1 + w * 3)] for y in range(h)]
    assert b"".join(rows) == pixels
    with pytest.raises(ValueError):
        ppm_to_png(b"P6\n5 3\n255\n" + pixels[:-1])
    with pytest.raises(ValueError):
        ppm_to_png(b"P3\n1 1\n255\n0 0 0")


ORIG = """<domain type='kvm'>
  <name>web01</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <metadata><x:owner xmlns:x='urn:x' pid='1'/></metadata>
  <memory unit='MiB'>512</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/prod/web01.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/prod/scratch.raw'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>
      <model type='virtio'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/var/lib/x/agent.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' port='5901' autoport='no' listen='0.0.0.0'/>
    <hostdev mode='subsystem' type='pci'/>
    <tpm model='tpm-crb'><backend type='emulator'/></tpm>
  </devices>
</domain>"""


def test_sandbox_xml_is_isolated() -> None:
    xml = sb.sandbox_xml(ORIG, name="vmdr-verify-web01-abcd", console_log="/sb/console.log",
                         overlays={"vda": ("/sb/vda.qcow2", "/sb/sock/vda.sock")},
                         sandbox="/sb")
    root = ET.fromstring(xml)
    assert root.findtext("name") == "vmdr-verify-web01-abcd"
    assert root.findtext("uuid") != "11111111-2222-3333-4444-555555555555"
    assert "/prod/" not in xml and "br0" not in xml and "52:54:00:aa:bb:cc" not in xml
    assert root.find("devices/interface") is None
    assert root.find("devices/hostdev") is None and root.find("devices/tpm") is None
    disks = root.findall("devices/disk")
    vda = next(d for d in disks if d.find("target").get("dev") == "vda")  # type: ignore[union-attr]
    assert vda.find("source").get("file") == "/sb/vda.qcow2"  # type: ignore[union-attr]
    assert vda.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    bs = vda.find("backingStore")
    assert bs is not None and bs.get("type") == "network"
    assert bs.find("source").get("protocol") == "nbd"  # type: ignore[union-attr]
    assert bs.find("source/host").get("socket") == "/sb/sock/vda.sock"  # type: ignore[union-attr]
    assert not any(d.find("target").get("dev") == "vdc" for d in disks)  # type: ignore[union-attr]
    cd = next(d for d in disks if d.get("device") == "cdrom")
    assert cd.find("source") is None
    assert root.find("devices/serial/log").get("file") == "/sb/console.log"  # type: ignore[union-attr]
    assert root.find("devices/channel/source") is None
    g = root.find("devices/graphics")
    assert g is not None and g.get("listen") == "127.0.0.1" and g.get("autoport") == "yes"
    assert "urn:x" not in xml and sb.META_NS in xml
    assert sb.has_agent_channel(xml)


def test_sandbox_xml_isolated_network() -> None:
    xml = sb.sandbox_xml(ORIG, name="v", console_log="/c.log", network="vmdr-iso",
                         overlays={"vda": ("/o.qcow2", "/s.sock")})
    ifaces = ET.fromstring(xml).findall("devices/interface")
    assert len(ifaces) == 1 and ifaces[0].get("type") == "network"
    assert ifaces[0].find("source").get("network") == "vmdr-iso"  # type: ignore[union-attr]
    assert ifaces[0].find("mac").get("address") != "52:54:00:aa:bb:cc"  # type: ignore[union-attr]


def test_state_owner_and_cleanup_of_dead_owner(tmp_path: Path) -> None:
    root = Path(sb.verify_root(str(tmp_path)))
    alive = sb.make_sandbox(str(tmp_path), "vmdr-verify-a", None)
    sb.write_state(alive, sb.SandboxState("vmdr-verify-a", ""))
    dead = sb.make_sandbox(str(tmp_path), "vmdr-verify-b", None)
    sb.write_state(dead, sb.SandboxState("vmdr-verify-b", "", pid=2**22 + 17,
                                         starttime="1"))
    (Path(dead) / "vda.qcow2").write_bytes(b"x")
    st = sb.read_state(alive)
    assert st is not None and st.owner_alive()
    done = sb.cleanup_leftovers(None, str(tmp_path))
    assert done == [f"removed {dead}"]
    assert sorted(os.listdir(root)) == ["vmdr-verify-a"]


def test_repo_url_and_argument_checks(served: tuple[Repository, Snapshot, bytes],
                                      tmp_path: Path) -> None:
    repo, snap, _ = served
    assert repo_url(repo.backend) == str(tmp_path / "repo")
    wrapped = wrap(open_backend(str(tmp_path / "repo")))
    assert repo_url(wrapped) == str(tmp_path / "repo")
    with pytest.raises(UsageError, match="no disk 'vdz'"):
        start_server(repo, snap, disks=["vdz"])
    with pytest.raises(UsageError, match="not both"):
        start_server(repo, snap, socket_dir=str(tmp_path), port=10809)
    with pytest.raises(UsageError, match="no such user"):
        start_server(repo, snap, socket_owner="no-such-user-vmdr")
