"""One conformance suite for every storage backend (file, sftp, s3), after restic's
backend test suite and borgstore's backend tests. See ``vmdr.storage.base``."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from vmdr.errors import ObjectNotFound, UsageError
from vmdr.storage.base import Backend
from vmdr.storage.registry import open_backend
from vmdr.storage.wrappers import wrap

if TYPE_CHECKING:
    from tests.integration.conftest import BackendCase


def names(backend: Backend, prefix: str) -> set[str]:
    return {info.name for info in backend.list(prefix)}


def test_create_is_idempotent(backend_case: BackendCase) -> None:
    b = backend_case.backend
    b.create()
    b.put("config", b"x")
    again = open_backend(backend_case.url)
    try:
        again.create()
        assert again.get("config") == b"x"
    finally:
        again.close()


@pytest.mark.parametrize("size", [0, 1, 1000, 8 * 1024 * 1024])
def test_put_get_round_trip(any_backend: Backend, size: int) -> None:
    data = os.urandom(size)
    any_backend.put("data/ab/obj", data)
    assert any_backend.get("data/ab/obj") == data
    info = any_backend.stat("data/ab/obj")
    assert (info.name, info.size) == ("data/ab/obj", size)
    assert info.mtime > 1_600_000_000


def test_overwrite_replaces(any_backend: Backend) -> None:
    any_backend.put("index/1", b"old contents, longer")
    any_backend.put("index/1", b"new")
    assert any_backend.get("index/1") == b"new"
    assert any_backend.stat("index/1").size == 3
    assert names(any_backend, "index") == {"index/1"}


def test_missing_object(any_backend: Backend) -> None:
    for call in (
        lambda: any_backend.get("data/nope"),
        lambda: any_backend.get_range("data/nope", 0, 10),
        lambda: any_backend.stat("data/nope"),
        lambda: any_backend.delete("data/nope"),
    ):
        with pytest.raises(ObjectNotFound):
            call()
    assert not any_backend.exists("data/nope")


def test_exists_and_delete(any_backend: Backend) -> None:
    any_backend.put("locks/a", b"1")
    assert any_backend.exists("locks/a")
    any_backend.delete("locks/a")
    assert not any_backend.exists("locks/a")
    with pytest.raises(ObjectNotFound):
        any_backend.get("locks/a")
    with pytest.raises(ObjectNotFound):
        any_backend.delete("locks/a")


def test_get_range(any_backend: Backend) -> None:
    data = bytes(range(256)) * 40
    any_backend.put("packs/p", data)
    assert any_backend.get_range("packs/p", 0, 10) == data[:10]
    assert any_backend.get_range("packs/p", 100, 1000) == data[100:1100]
    assert any_backend.get_range("packs/p", len(data) - 5, 100) == data[-5:]
    assert any_backend.get_range("packs/p", len(data), 10) == b""
    assert any_backend.get_range("packs/p", len(data) + 50, 10) == b""
    assert any_backend.get_range("packs/p", 5, 0) == b""


def test_put_if_absent(any_backend: Backend) -> None:
    assert any_backend.put_if_absent("data/c", b"first") is True
    assert any_backend.put_if_absent("data/c", b"second") is False
    assert any_backend.get("data/c") == b"first"


def test_list_recursive(any_backend: Backend) -> None:
    objects = {
        "data/00/a": b"a", "data/00/b": b"bb", "data/ff/deep/c": b"ccc",
        "snapshots/s1": b"s", "data2/x": b"x",
    }
    for name, data in objects.items():
        any_backend.put(name, data)
    listing = {i.name: i.size for i in any_backend.list("data")}
    assert listing == {"data/00/a": 1, "data/00/b": 2, "data/ff/deep/c": 3}
    assert names(any_backend, "data/00") == {"data/00/a", "data/00/b"}
    assert names(any_backend, "snapshots") == {"snapshots/s1"}
    assert names(any_backend, "nothing") == set()
    assert names(any_backend, "data/zz/yy") == set()


def test_list_of_an_object_name_yields_nothing(backend_case: BackendCase) -> None:
    backend_case.backend.put("data/00/a", b"a")
    assert names(backend_case.backend, "data/00/a") == set()  # no object under "data/00/a/"


def test_tmp_files_never_listed(backend_case: BackendCase) -> None:
    b = backend_case.backend
    b.put("data/real", b"r")
    b.put("data/named.tmp", b"t")
    if backend_case.raw_write is not None:  # a crashed writer's leftover
        backend_case.raw_write("data/real.0123456789ab.tmp", b"partial")
        backend_case.raw_write("data/sub/other.abcdef.tmp", b"partial")
    assert names(b, "data") == {"data/real"}


def test_put_leaves_no_temporary_files(backend_case: BackendCase) -> None:
    b = backend_case.backend
    for i in range(5):
        b.put(f"data/{i}", b"x" * i)
        b.put(f"data/{i}", b"y" * i)
    assert len(names(b, "data")) == 5
    if backend_case.raw_root is not None:
        files = {p.name for p in backend_case.raw_root.rglob("*") if p.is_file()}
        assert files == {str(i) for i in range(5)}


def test_readers_never_see_partial_writes(any_backend: Backend) -> None:
    versions = [bytes([v]) * (200_000 + 50_000 * v) for v in range(3)]
    any_backend.put("index/hot", versions[0])
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(12):
                any_backend.put("index/hot", versions[i % 3])
        finally:
            done.set()

    def reader() -> int:
        reads = 0
        while not done.is_set() or reads == 0:
            assert any_backend.get("index/hot") in versions
            reads += 1
        return reads

    with ThreadPoolExecutor(3) as pool:
        readers = [pool.submit(reader) for _ in range(2)]
        pool.submit(writer).result()
        assert all(r.result() > 0 for r in readers)


def test_concurrent_put_get(any_backend: Backend) -> None:
    blobs = {f"data/{i:02x}/{j}": os.urandom(1000 + 97 * i + j) for i in range(8) for j in range(6)}
    barrier = threading.Barrier(8)

    def worker(i: int) -> int:
        barrier.wait(timeout=30)
        mine = {k: v for k, v in blobs.items() if k.startswith(f"data/{i:02x}/")}
        for name, data in mine.items():
            any_backend.put(name, data)
            any_backend.put("shared/last", data)  # contended overwrite
        for name, data in mine.items():
            assert any_backend.get(name) == data
        return len(mine)

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == len(blobs)
    assert names(any_backend, "data") == set(blobs)
    assert any_backend.get("shared/last") in blobs.values()


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/../b", "a/./b", "", "a/", "x y"])
def test_invalid_names_rejected(any_backend: Backend, bad: str) -> None:
    for call in (
        lambda: any_backend.put(bad, b"x"),
        lambda: any_backend.get(bad),
        lambda: any_backend.stat(bad),
        lambda: any_backend.delete(bad),
        lambda: list(any_backend.list(bad)),
    ):
        with pytest.raises(UsageError):
            call()


def test_display_url_has_no_password(backend_case: BackendCase) -> None:
    b = backend_case.backend
    assert b.display_url
    assert "***" not in b.display_url  # no password in these URLs to begin with
    assert b.display_url in repr(b)
    if backend_case.kind == "sftp":
        secret = backend_case.url.replace("sftp://root@", "sftp://root:hunter2@")
        with open_backend(secret) as other:
            assert "hunter2" not in other.display_url
            assert "hunter2" not in repr(other)


def test_wrapped_backend_behaves_the_same(any_backend: Backend) -> None:
    b = wrap(any_backend, connections=4)
    b.create()
    b.put("data/w/1", b"one")
    assert b.put_if_absent("data/w/1", b"other") is False
    assert b.get("data/w/1") == b"one"
    assert b.get_range("data/w/1", 1, 5) == b"ne"
    assert b.exists("data/w/1")
    assert b.stat("data/w/1").size == 3
    assert names(b, "data") == {"data/w/1"}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: b.put(f"data/w/p{i}", bytes([i]) * i), range(16)))
    assert len(names(b, "data/w")) == 17
    with pytest.raises(ObjectNotFound):
        b.get("data/missing")
    b.delete("data/w/1")
    assert not b.exists("data/w/1")
    with pytest.raises(UsageError):
        b.put("../escape", b"x")
