"""Object and manifest codecs, including property-based round trips and tamper checks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmdr.errors import IntegrityError, UnsupportedFormat
from vmdr.repository import manifest
from vmdr.repository.crypto import HOLE, TYPE_CHUNK, TYPE_SNAPSHOT, MasterKey, ObjectCodec
from vmdr.repository.manifest import ChunkList, DiskRecord, Snapshot, chunk_count

KEY = MasterKey(bytes(range(64)))
CODECS = [ObjectCodec(KEY), ObjectCodec(None)]


@pytest.mark.parametrize("codec", CODECS, ids=["aes", "plain"])
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20000), compress=st.booleans())
def test_object_round_trip(codec: ObjectCodec, data: bytes, compress: bool) -> None:
    oid = codec.object_id(data)
    blob = codec.pack(TYPE_CHUNK, oid, data, compress)
    assert codec.unpack(TYPE_CHUNK, oid, blob) == data


@pytest.mark.parametrize("codec", CODECS, ids=["aes", "plain"])
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=20000), compress=st.booleans())
def test_object_round_trip_into_a_buffer(codec: ObjectCodec, data: bytes,
                                         compress: bool) -> None:
    oid = codec.object_id(data)
    blob = codec.pack(TYPE_CHUNK, oid, data, compress)
    out = bytearray(len(data))
    codec.unpack_into(TYPE_CHUNK, oid, blob, memoryview(out))
    assert out == data
    for wrong in (len(data) + 1, max(0, len(data) - 1)):  # never a partial or padded chunk
        if wrong != len(data):
            with pytest.raises(IntegrityError):
                codec.unpack_into(TYPE_CHUNK, oid, blob, memoryview(bytearray(wrong)))


def test_ids_are_keyed() -> None:
    data = b"same content"
    assert ObjectCodec(KEY).object_id(data) != ObjectCodec(None).object_id(data)
    assert ObjectCodec(KEY).object_id(data) != ObjectCodec(MasterKey(bytes(64))).object_id(data)


def test_incompressible_data_stored_uncompressed() -> None:
    import os

    c = ObjectCodec(KEY)
    data = os.urandom(100_000)
    blob = c.pack(TYPE_CHUNK, c.object_id(data), data)
    assert blob[2] == 0  # compression flag: none
    text = b"abc" * 30000
    assert c.pack(TYPE_CHUNK, c.object_id(text), text)[2] == 1


@pytest.mark.parametrize("codec", CODECS, ids=["aes", "plain"])
def test_tampering_is_detected(codec: ObjectCodec) -> None:
    data = b"important bytes" * 100
    oid = codec.object_id(data)
    blob = bytearray(codec.pack(TYPE_CHUNK, oid, data))
    out = memoryview(bytearray(len(data)))
    for pos in (len(blob) - 1, len(blob) // 2, 5, 2):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(IntegrityError):
            codec.unpack(TYPE_CHUNK, oid, bytes(bad))
        with pytest.raises(IntegrityError):
            codec.unpack_into(TYPE_CHUNK, oid, bytes(bad), out)
    for cut in (3, len(blob) - 10):  # truncated header, truncated payload
        with pytest.raises(IntegrityError):
            codec.unpack_into(TYPE_CHUNK, oid, bytes(blob[:cut]), out)
    with pytest.raises(IntegrityError):
        codec.unpack_into(TYPE_CHUNK, codec.object_id(b"other"), bytes(blob), out)
    with pytest.raises(IntegrityError):  # truncated
        codec.unpack(TYPE_CHUNK, oid, bytes(blob[:3]))
    with pytest.raises(IntegrityError):  # truncated payload
        codec.unpack(TYPE_CHUNK, oid, bytes(blob[:-10]))
    with pytest.raises(IntegrityError):  # swapped: right bytes under another ID
        codec.unpack(TYPE_CHUNK, codec.object_id(b"other"), bytes(blob))
    with pytest.raises(IntegrityError):  # reinterpreted as another type
        codec.unpack(TYPE_SNAPSHOT, oid, bytes(blob))
    newer = bytearray(blob)
    newer[0] = 9
    with pytest.raises(UnsupportedFormat):
        codec.unpack(TYPE_CHUNK, oid, bytes(newer))


def test_encrypted_codec_refuses_plain_objects() -> None:
    plain = ObjectCodec(None)
    data = b"x" * 1000
    blob = plain.pack(TYPE_CHUNK, ObjectCodec(KEY).object_id(data), data)
    with pytest.raises(IntegrityError):
        ObjectCodec(KEY).unpack(TYPE_CHUNK, ObjectCodec(KEY).object_id(data), blob)


ids = st.one_of(st.just(HOLE), st.binary(min_size=32, max_size=32))
names = st.text(min_size=1, max_size=30)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    cs = draw(st.sampled_from([65536, 1 << 20, 4 << 20]))
    disks = []
    for i in range(draw(st.integers(0, 3))):
        size = draw(st.integers(0, 40 * cs))
        n = chunk_count(size, cs)
        chunks = ChunkList(b"".join(draw(st.lists(ids, min_size=n, max_size=n))))
        disks.append(DiskRecord(f"vd{chr(97 + i)}", size, chunks,
                                draw(st.sampled_from(["raw", "qcow2"])),
                                {"path": draw(names)}))
    t = draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                          timezones=st.just(UTC)))
    return Snapshot(name=draw(names), time=t, chunk_size=cs, disks=disks,
                    tags=draw(st.lists(names, max_size=3)), host=draw(names),
                    parent=draw(st.one_of(st.none(), st.text("0123456789abcdef", min_size=64,
                                                               max_size=64))),
                    meta={"xml": draw(st.text(max_size=200)), "n": draw(st.integers())},
                    stats={"bytes_read": draw(st.integers(0, 2**50))})


@settings(max_examples=80, deadline=None)
@given(s=snapshots())
def test_manifest_round_trip(s: Snapshot) -> None:
    back = manifest.decode(manifest.encode(s), "ab" * 32)
    assert back.name == s.name and back.time == s.time and back.tags == s.tags
    assert back.meta == s.meta and back.parent == s.parent and back.stats == s.stats
    assert [(d.name, d.size, d.format, d.meta, d.chunks) for d in back.disks] == \
        [(d.name, d.size, d.format, d.meta, d.chunks) for d in s.disks]


@settings(max_examples=50, deadline=None)
@given(s=snapshots(), cut=st.integers(1, 200))
def test_truncated_manifest_is_rejected(s: Snapshot, cut: int) -> None:
    data = manifest.encode(s)
    with pytest.raises(IntegrityError):
        manifest.decode(data[: max(0, len(data) - cut)])


def test_manifest_is_compact() -> None:
    n = 16384  # a 64 GiB disk
    s = Snapshot("big", datetime(2026, 1, 1, tzinfo=UTC), 4 << 20,
                 [DiskRecord("vda", n * (4 << 20), ChunkList.holes(n))])
    assert len(manifest.encode(s)) < n * 32 + 1024


def test_unknown_manifest_version() -> None:
    s = Snapshot("a", datetime(2026, 1, 1, tzinfo=UTC), 65536)
    data = bytearray(manifest.encode(s))
    data[8] = 2
    with pytest.raises(UnsupportedFormat):
        manifest.decode(bytes(data))
