"""``vmdr copy`` between real repositories: a directory, SFTP (OpenSSH on loopback) and S3
(SeaweedFS), plus server-side immutability: an SFTP server that refuses deletes, files
made immutable on the server, and S3 Object Lock."""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.integration.servers import SeaweedFS, SSHServer, start_sshd
from tests.unit.repofixtures import PASS, SMALL_CHUNK, make_image
from vmdr.errors import StorageError
from vmdr.jobs import diskcopy
from vmdr.jobs.copy import CopyOptions, copy_snapshots
from vmdr.jobs.image import backup_image
from vmdr.repository.keys import KdfParams
from vmdr.repository.repo import Repository
from vmdr.storage import objectlock
from vmdr.storage.base import Backend
from vmdr.storage.faulty import Fault, FaultyBackend
from vmdr.storage.registry import open_backend
from vmdr.storage.throttle import ThrottlingBackend, TokenBucket

SIZE = 768 << 10  # 12 chunks of 64 KiB
_n = itertools.count()
BUCKET = "vmdr-copy"


@pytest.fixture
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """One fresh location per kind; the sftp/s3 servers start only when a test uses them."""

    class Lazy(dict[str, str]):
        def __missing__(self, kind: str) -> str:
            n = next(_n)
            if kind == "file":
                url = str(tmp_path / f"file{n}")
            elif kind == "sftp":
                request.getfixturevalue("sftp_env")
                sshd: SSHServer = request.getfixturevalue("sshd_server")
                url = sshd.url(str(sshd.data_dir / f"copy{os.getpid()}-{n}"))
            else:
                fs: SeaweedFS = request.getfixturevalue("s3_env")
                url = f"s3://{BUCKET}/run{os.getpid()}/c{n}?endpoint={fs.endpoint}&path_style=1"
            self[kind] = url
            return url

    yield Lazy()


def init(url: str, src: Repository | None = None, pw: str = PASS) -> Repository:
    return Repository.init(open_backend(url), passphrase=pw, chunk_size=SMALL_CHUNK,
                           kdf=KdfParams.for_tests(), master=src.key if src else None)


def opened(url: str | Backend, pw: str = PASS) -> Repository:
    backend = open_backend(url) if isinstance(url, str) else url
    return Repository.open(backend, passphrase=lambda: pw)


def fill(repo: Repository, tmp_path: Path, seeds: tuple[int, ...] = (1, 2)) -> list[bytes]:
    images = []
    for seed in seeds:
        img = tmp_path / f"img{seed}.raw"
        images.append(make_image(str(img), SIZE, seed=seed))
        snap = backup_image(repo, str(img), f"vm{seed}", workers=2).snapshot
        repo.set_protected(snap.id, True)
    return images


def restored(repo: Repository, tmp_path: Path) -> list[bytes]:
    out = []
    for s in repo.list_snapshots():
        p = tmp_path / f"r-{s.id[:12]}-{next(_n)}"
        diskcopy.restore(repo, s.disks[0], str(p))
        out.append(p.read_bytes())
    return out


def stored(repo: Repository) -> dict[str, bytes]:
    return {o.name: repo.backend.get(o.name) for o in repo.backend.list("data")}


@pytest.mark.sftp
@pytest.mark.s3
@pytest.mark.parametrize("pair,shared", [
    (("file", "sftp"), True), (("sftp", "s3"), False), (("s3", "file"), True)])
def test_copy_between_backends(urls: dict[str, str], tmp_path: Path,
                               pair: tuple[str, str], shared: bool) -> None:
    with init(urls[pair[0]]) as src:
        images = fill(src, tmp_path)
        with init(urls[pair[1]], src if shared else None, pw="offsite") as dst:
            res = copy_snapshots(src, dst, CopyOptions(workers=3))
            assert res.mode == ("raw" if shared else "re-encrypt") and len(res.copied) == 2
            assert res.attachments_copied == 2
            if shared:
                assert stored(dst) == stored(src)  # stored bytes unchanged
            else:
                assert not set(stored(dst)) & set(stored(src))
            assert restored(dst, tmp_path) == images
            assert all(dst.is_protected(s.id) for s in dst.list_snapshots())
            again = copy_snapshots(src, dst)
            assert again.chunks_sent == 0 and not again.copied


@pytest.mark.s3
def test_interrupted_copy_to_s3_resumes(urls: dict[str, str], tmp_path: Path) -> None:
    with init(urls["file"]) as src:
        images = fill(src, tmp_path)
        init(urls["s3"], pw="offsite").close()
        faulty = FaultyBackend(open_backend(urls["s3"]))
        faulty.add(Fault("put", "data/*", StorageError("network down"), after=8))
        with opened(faulty, "offsite") as dst, pytest.raises(StorageError):
            copy_snapshots(src, dst, CopyOptions(workers=2))
        with opened(urls["s3"], "offsite") as dst:
            arrived = set(stored(dst))
            assert len(arrived) >= 8 and not dst.list_snapshots()
        counting = FaultyBackend(open_backend(urls["s3"]))
        with opened(counting, "offsite") as dst:
            copy_snapshots(src, dst)
            resent = {n for m, n in counting.calls if m == "put" and n.startswith("data/")}
            assert resent and not resent & arrived
            assert restored(dst, tmp_path) == images


@pytest.mark.sftp
def test_bandwidth_limit_limits(urls: dict[str, str], tmp_path: Path) -> None:
    rate = 256 << 10
    with init(urls["file"]) as src:
        fill(src, tmp_path, seeds=(7,))
        init(urls["sftp"]).close()
        bucket = TokenBucket(rate, burst=64 << 10)
        with opened(ThrottlingBackend(open_backend(urls["sftp"]), bucket)) as dst:
            t0 = time.monotonic()
            res = copy_snapshots(src, dst)
            elapsed = time.monotonic() - t0
    floor = (res.bytes_sent - (64 << 10)) / rate
    assert res.bytes_sent > 300 << 10
    assert floor * 0.8 <= elapsed < floor + 20, (elapsed, res.bytes_sent)


# -- server-side immutability: SFTP ------------------------------------------------------


@pytest.fixture(scope="module")
def no_delete_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """An OpenSSH whose sftp-server refuses remove/rmdir/rename (posix-rename allowed)."""
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("openssh-server is not installed")
    server = start_sshd(tmp_path_factory.mktemp("sshd-nodelete"))
    server.stop()
    cfg = server.workdir / "sshd_config"
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith("Subsystem")]
    lines.append("Subsystem sftp internal-sftp -P remove,rmdir,rename,hardlink,symlink,"
                 "setstat,fsetstat,lsetstat")
    cfg.write_text("\n".join(lines) + "\n")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.sftp
def test_sftp_server_refusing_deletes(no_delete_sshd: SSHServer, sftp_env: None,
                                      tmp_path: Path) -> None:
    root = no_delete_sshd.data_dir / f"ro{next(_n)}"
    url = no_delete_sshd.url(str(root))
    with init(str(tmp_path / "src")) as src:
        images = fill(src, tmp_path, seeds=(3,))
        with init(url, src) as dst:  # init, copy, lock and release all work
            copy_snapshots(src, dst)
            sid = dst.list_snapshots()[0].id
            with pytest.raises(StorageError, match="permission denied"):
                dst.delete_snapshot(sid)
            name = next(iter(stored(dst)))
            with pytest.raises(StorageError, match="permission denied"):
                dst.backend.delete(name)
            assert restored(dst, tmp_path) == images
            # posix-rename is needed for atomic puts, and it replaces existing files:
            # deletes are refused, overwrites are not (see docs: make files immutable)
            dst.backend.put("vmdr-scratch", b"1")
            dst.backend.put("vmdr-scratch", b"2")
            assert dst.backend.get("vmdr-scratch") == b"2"
            with dst.lock(exclusive=False, command="copy"):  # release only logs a warning
                pass
        assert len(list(root.glob("locks/*"))) == 1  # left behind, to go stale


@pytest.mark.sftp
def test_immutable_files_on_the_sftp_server(sshd_server: SSHServer, sftp_env: None,
                                            tmp_path: Path) -> None:
    root = sshd_server.data_dir / f"imm{next(_n)}"
    with init(str(tmp_path / "src")) as src:
        images = fill(src, tmp_path, seeds=(4,))
        with init(sshd_server.url(str(root)), src) as dst:
            copy_snapshots(src, dst)
            objs = [p for p in root.rglob("*") if p.is_file() and "locks" not in p.parts]
            try:
                chattr = subprocess.run(["chattr", "+i", *map(str, objs)], capture_output=True)
                if chattr.returncode:
                    pytest.skip(f"chattr +i not possible here: {chattr.stderr.decode()}")
                name = next(iter(stored(dst)))
                with pytest.raises(StorageError):
                    dst.backend.delete(name)
                with pytest.raises(StorageError):
                    dst.backend.put(name, b"overwrite")
                with pytest.raises(StorageError):
                    dst.delete_snapshot(dst.list_snapshots()[0].id)
                assert restored(dst, tmp_path) == images
            finally:
                subprocess.run(["chattr", "-i", *map(str, objs)], capture_output=True)


# -- server-side immutability: S3 Object Lock ---------------------------------------------


@pytest.mark.s3
def test_s3_object_lock(s3_env: SeaweedFS, tmp_path: Path) -> None:
    bucket = f"vmdr-lock-{os.getpid()}-{next(_n)}"
    url = f"s3://{bucket}/repo?endpoint={s3_env.endpoint}&path_style=1"
    raw, entry = objectlock.for_new_repository(open_backend(url), "governance", 1)
    assert entry == {"mode": "GOVERNANCE", "days": 1}
    Repository.init(raw, passphrase=PASS, chunk_size=SMALL_CHUNK, kdf=KdfParams.for_tests(),
                    extra_config={"object_lock": entry}).close()
    with init(str(tmp_path / "src")) as src:
        images = fill(src, tmp_path, seeds=(5,))
        with opened(objectlock.with_object_lock(open_backend(url))) as dst:
            assert isinstance(dst.backend, objectlock.ObjectLockBackend)
            copy_snapshots(src, dst)
            with dst.lock(exclusive=False, command="test"):
                pass
            sid = dst.list_snapshots()[0].id
    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint, region_name="us-east-1")
    chunk = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="repo/data/")
                 ["Contents"])
    head = s3.head_object(Bucket=bucket, Key=chunk)
    assert head["ObjectLockMode"] == "GOVERNANCE" and head["ObjectLockRetainUntilDate"]
    assert s3.head_object(Bucket=bucket, Key="repo/vmdr-repo")["ObjectLockMode"] == "GOVERNANCE"
    version = head["VersionId"]
    with pytest.raises(s3.exceptions.ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=bucket, Key=chunk, VersionId=version)
    # a plain delete (what forget/prune would do) only adds a delete marker ...
    with opened(objectlock.with_object_lock(open_backend(url))) as dst:
        dst.delete_snapshot(sid)
        assert not dst.list_snapshots()
    # ... and the locked version is still there to be brought back
    versions = s3.list_object_versions(Bucket=bucket, Prefix="repo/snapshots/")
    marker = versions["DeleteMarkers"][0]
    s3.delete_object(Bucket=bucket, Key=marker["Key"], VersionId=marker["VersionId"])
    with opened(url) as dst:
        assert restored(dst, tmp_path) == images
