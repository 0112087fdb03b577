"""Object, pack and index formats: round trips and damage detection (Hypothesis)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskvault.crypto.aead import AesGcmCipher, PlainCipher
from diskvault.crypto.ids import IdHasher
from diskvault.errors import IntegrityError
from diskvault.repository.compression import Compression
from diskvault.repository.index import ChunkIndex
from diskvault.repository.objects import ObjectCodec
from diskvault.repository.pack import PackWriter, parse_pack

SPECS = ["none", "lz4", "zstd,1", "zstd,3", "auto,zstd,6", "auto,lz4"]
KEY = os.urandom(32)


def codec(encrypted: bool, spec: str = "lz4") -> ObjectCodec:
    cipher = AesGcmCipher(KEY) if encrypted else PlainCipher()
    return ObjectCodec(cipher, IdHasher(b"k" * 32), Compression.parse(spec))


payloads = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda n, b: b * n, st.integers(0, 20000), st.binary(min_size=1, max_size=7)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads, spec=st.sampled_from(SPECS), encrypted=st.booleans())
def test_object_round_trip(data, spec, encrypted):
    c = codec(encrypted, spec)
    cid = c.id_hash(data)
    blob = c.seal(cid, data)
    assert c.open_chunk(cid, blob) == data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=1, max_size=2048), encrypted=st.booleans(),
       pos=st.integers(0, 10**6), bit=st.integers(0, 7), cut=st.integers(0, 10**6))
def test_damaged_object_is_an_integrity_error(data, encrypted, pos, bit, cut):
    c = codec(encrypted)
    cid = c.id_hash(data)
    blob = bytearray(c.seal(cid, data))
    flipped = bytearray(blob)
    flipped[pos % len(blob)] ^= 1 << bit
    with pytest.raises(IntegrityError):
        c.open_chunk(cid, bytes(flipped))
    with pytest.raises(IntegrityError):
        c.open_chunk(cid, bytes(blob[: cut % len(blob)]))
    other = c.id_hash(data + b"x")  # a valid object presented under another id
    with pytest.raises(IntegrityError):
        c.open_chunk(other, bytes(blob))


def test_encrypted_object_hides_plaintext_and_never_repeats_nonce():
    c = codec(True, "none")
    data = b"secret text " * 100
    cid = c.id_hash(data)
    a, b = c.seal(cid, data), c.seal(cid, data)
    assert b"secret text" not in a
    assert a[:25] != b[:25]  # header = session + counter: unique per seal
    c2 = codec(True, "none")  # another writer process: another session key
    assert c2.seal(cid, data)[1:17] != a[1:17]
    assert c.open_chunk(cid, c2.seal(cid, data)) == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12),
       encrypted=st.booleans())
def test_pack_round_trip(chunks, encrypted):
    c = codec(encrypted)
    w = PackWriter(target_size=1 << 20)
    ids = []
    for d in chunks:
        cid = c.id_hash(d)
        ids.append(cid)
        w.add(cid, c.seal(cid, d), len(d))
    name, data, entries = w.finish(c)
    parsed = parse_pack(data, c, name)
    assert [(e.id, e.offset, e.length, e.plain_size) for e in parsed] == \
        [(e.id, e.offset, e.length, e.plain_size) for e in entries]
    for e, d in zip(parsed, chunks, strict=True):
        assert c.open_chunk(e.id, data[e.offset : e.offset + e.length]) == d


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(0, 10**6), cut=st.integers(0, 10**6), encrypted=st.booleans())
def test_damaged_pack_is_an_integrity_error(pos, cut, encrypted):
    c = codec(encrypted)
    w = PackWriter(target_size=1 << 20)
    for d in (b"a" * 500, os.urandom(700)):
        w.add(c.id_hash(d), c.seal(c.id_hash(d), d), len(d))
    name, data, _ = w.finish(c)
    bad = bytearray(data)
    bad[pos % len(bad)] ^= 0x40
    with pytest.raises(IntegrityError):
        parse_pack(bytes(bad), c, name)
    with pytest.raises(IntegrityError):
        parse_pack(data[: cut % len(data)], c, None)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), garbage=st.binary(max_size=200))
def test_index_round_trip_and_garbage(n, garbage):
    idx = ChunkIndex()
    ids = [os.urandom(32) for _ in range(n)]
    for i, cid in enumerate(ids):
        idx.add(cid, f"pack{i % 5}", i * 10, i + 1, i + 2)
    back = ChunkIndex.from_bytes(idx.to_bytes())
    assert len(back) == n
    for i, cid in enumerate(ids):
        loc = back.get(cid)
        assert loc is not None and (loc.pack, loc.offset, loc.length, loc.plain_size) == \
            (f"pack{i % 5}", i * 10, i + 1, i + 2)
    try:
        ChunkIndex.from_bytes(garbage)
    except IntegrityError:
        pass


def test_compression_auto_stores_random_data_uncompressed():
    comp = Compression.parse("auto,zstd,3")
    rnd = os.urandom(1 << 16)
    assert comp.compress(rnd)[0] == 0  # NONE
    assert comp.compress(b"abc" * 30000)[0] == 2  # ZSTD
