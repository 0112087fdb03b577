"""The write path's pieces: chunks sealed as parts, packs hashed as they fill and
written with writev, untagged (suite 2) chunks, sampled ``auto`` compression."""

from __future__ import annotations

import json
import os
import random

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskvault.crypto.aead import SUITE_NONE_ID_CHECKED, AesGcmCipher, PlainCipher
from diskvault.crypto.ids import IdHasher
from diskvault.errors import IntegrityError
from diskvault.repository import compression
from diskvault.repository.compression import HEADER, LZ4, NONE, Compression
from diskvault.repository.objects import ObjectCodec, Sealed
from diskvault.repository.pack import PackWriter, parse_pack, read_toc
from diskvault.storage import local
from diskvault.storage.local import LocalStore

SPECS = ["none", "lz4", "zstd,3", "auto,lz4", "auto,zstd,3"]
KEY = os.urandom(32)
MiB = 1 << 20


def codec(encrypted: bool, spec: str = "lz4", untagged: bool = False) -> ObjectCodec:
    cipher = AesGcmCipher(KEY) if encrypted else PlainCipher()
    return ObjectCodec(cipher, IdHasher(b"k" * 32), Compression.parse(spec),
                       untagged_chunks=untagged)


def _mixed(seed: int, n: int, layout: str) -> bytes:
    """Random, text-like and zero runs in the given order (one letter per run)."""
    rnd = random.Random(seed)
    run = n // len(layout)
    out = bytearray()
    for kind in layout:
        if kind == "r":
            out += rnd.randbytes(run)
        elif kind == "t":
            out += b" ".join(rnd.choice([b"alpha", b"beta", b"gamma", b"delta"])
                             for _ in range(run // 5))[:run].ljust(run, b".")
        else:
            out += bytes(run)
    return bytes(out)


payloads = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda n, b: b * n, st.integers(0, 20000), st.binary(min_size=1, max_size=7)),
    # large enough for auto's sampling (≥ 256 KiB), with runs of every kind
    st.builds(_mixed, st.integers(0, 2**32), st.sampled_from([256 << 10, 300_001]),
              st.text("rtz", min_size=1, max_size=6)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=payloads, spec=st.sampled_from(SPECS), encrypted=st.booleans(),
       untagged=st.booleans())
def test_sealed_chunk_round_trip(data, spec, encrypted, untagged):
    c = codec(encrypted, spec, untagged)
    cid = c.id_hash(data)
    sealed = c.seal_chunk(cid, data)
    blob = bytes(sealed)
    assert len(sealed) == len(blob)
    # suite 2 only without encryption, and only where the codec is told so
    assert (blob[0] == SUITE_NONE_ID_CHECKED) == (untagged and not encrypted)
    assert c.open_chunk(cid, blob) == data
    if not untagged:  # identical to the one-buffer seal's format: old readers read it
        assert c.open_chunk(cid, bytes(c.seal(cid, data))) == data


def test_plain_seal_does_not_copy_the_data():
    data = bytearray(os.urandom(1 * MiB))
    for untagged in (False, True):
        sealed = codec(False, "auto,lz4", untagged).seal_chunk(b"i" * 32, data)
        assert any(p is data for p in sealed.parts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(min_size=1, max_size=2048),
                      st.builds(_mixed, st.integers(0, 2**32), st.just(256 << 10),
                                st.text("rtz", min_size=1, max_size=4))),
       spec=st.sampled_from(SPECS), pos=st.integers(0, 10**7), bit=st.integers(0, 7),
       cut=st.integers(0, 10**7))
def test_damaged_untagged_chunk_is_an_integrity_error(data, spec, pos, bit, cut):
    """Without a tag, the id check after opening never lets wrong data through: a
    changed byte is an error, or (a compressed stream is redundant: an lz4 match
    offset inside a run of zeros) decodes to the very same plaintext. Stored as is,
    every changed byte is an error. The pack name still changes (check finds it)."""
    c = codec(False, spec, untagged=True)
    cid = c.id_hash(data)
    blob = bytes(c.seal_chunk(cid, data))
    flipped = bytearray(blob)
    flipped[pos % len(blob)] ^= 1 << bit
    try:
        assert c.open_chunk(cid, bytes(flipped)) == data
        assert blob[1] != 0  # only a compressed payload may decode to the same bytes
    except IntegrityError:
        pass
    with pytest.raises(IntegrityError):
        c.open_chunk(cid, blob[: cut % len(blob)])
    with pytest.raises(IntegrityError):
        c.open_chunk(c.id_hash(data + b"x"), blob)


def test_untagged_objects_are_refused_where_no_id_check_follows():
    data = b"metadata " * 1000
    cid = codec(False).id_hash(data)
    blob = bytes(codec(False, untagged=True).seal_chunk(cid, data))
    assert blob[0] == SUITE_NONE_ID_CHECKED
    with pytest.raises(IntegrityError, match="damaged object header"):
        codec(False, untagged=False).open_chunk(cid, blob)  # a version 1 repository
    with pytest.raises(IntegrityError, match="damaged object header"):
        codec(False, untagged=True).open(cid, blob)  # metadata objects keep their tag
    # an encrypted repository never writes nor accepts them
    enc = codec(True, untagged=True)
    assert bytes(enc.seal_chunk(cid, data))[0] != SUITE_NONE_ID_CHECKED
    with pytest.raises(IntegrityError):
        enc.open_chunk(cid, blob)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(payloads, min_size=0, max_size=12), encrypted=st.booleans(),
       untagged=st.booleans(), spec=st.sampled_from(SPECS),
       as_bytes=st.lists(st.booleans(), min_size=12, max_size=12))
def test_pack_named_incrementally_matches_its_bytes(chunks, encrypted, untagged, spec,
                                                    as_bytes):
    c = codec(encrypted, spec, untagged)
    w = PackWriter(target_size=1 << 30)
    ids = []
    for i, data in enumerate(chunks):
        cid = c.id_hash(data)
        sealed = c.seal_chunk(cid, data)
        # Sealed parts and one-buffer blobs may be mixed in one pack
        w.add(cid, bytes(sealed) if as_bytes[i] else sealed, len(data))
        ids.append((cid, data))
    name, parts, size, entries = w.finish_parts(c)
    data = b"".join(parts)
    assert size == len(data)
    assert name == blake3.blake3(data).hexdigest()
    assert parse_pack(data, c, name) == entries
    assert [e.id for e in entries] == [cid for cid, _ in ids]
    for e, (_cid, plain) in zip(entries, ids, strict=True):
        assert e.plain_size == len(plain)
        assert c.open_chunk(e.id, data[e.offset : e.offset + e.length]) == plain
    # the writer is reset: a second pack starts empty and gets its own name
    assert len(w) == 0 and w.size == 8
    name2, parts2, _, entries2 = w.finish_parts(c)
    assert entries2 == [] and name2 == blake3.blake3(b"".join(parts2)).hexdigest()


def test_pack_entries_open_from_a_store_written_with_writev(tmp_path):
    c = codec(False, "auto,lz4", untagged=True)
    store = LocalStore(str(tmp_path / "repo"))
    store.create()
    w = PackWriter(target_size=1 << 30)
    chunks = [_mixed(s, 512 << 10, lay) for s, lay in enumerate(["r", "t", "rz", "tzr", "z"])]
    for data in chunks:
        w.add(c.id_hash(data), c.seal_chunk(c.id_hash(data), data), len(data))
    name, parts, size, _ = w.finish_parts(c)
    store.store_parts(f"packs/{name[:2]}/{name}", parts)
    assert store.size(f"packs/{name[:2]}/{name}") == size
    entries = read_toc(store.load, name, size, c)
    for e, data in zip(entries, chunks, strict=True):
        blob = store.load(f"packs/{name[:2]}/{name}", e.offset, e.length)
        assert c.open_chunk(e.id, blob) == data
    assert parse_pack(store.load(f"packs/{name[:2]}/{name}"), c, name) == entries


def test_writev_continues_after_short_writes_and_beyond_iov_max(tmp_path, monkeypatch):
    """The kernel may write less than asked and takes at most IOV_MAX buffers a call."""
    rnd = random.Random(5)
    parts: list = [rnd.randbytes(rnd.randint(0, 300)) for _ in range(3000)]
    parts[7] = bytearray(parts[7])
    parts[9] = memoryview(parts[9])
    real = os.writev
    calls = {"short": 0, "max_bufs": 0}

    def short_writev(fd, bufs):
        calls["max_bufs"] = max(calls["max_bufs"], len(bufs))
        total = sum(len(b) for b in bufs)
        limit = rnd.randint(1, max(1, total))
        if limit < total:
            calls["short"] += 1
        out, left = [], limit
        for b in bufs:
            if left <= 0:
                break
            out.append(memoryview(b)[:left])
            left -= len(out[-1])
        return real(fd, out)

    monkeypatch.setattr(local.os, "writev", short_writev)
    store = LocalStore(str(tmp_path / "s"))
    store.create()
    store.store_parts("packs/ab/x", parts)
    assert calls["short"] > 10  # the injected short writes happened
    assert calls["max_bufs"] <= local._IOV_MAX
    monkeypatch.setattr(local.os, "writev", real)
    assert store.load("packs/ab/x") == b"".join(parts)


def test_auto_skips_compression_of_random_data_without_trying_it(monkeypatch):
    data = os.urandom(4 * MiB)
    calls = []
    real = compression.lz4_compress  # the native part where it is built, else python-lz4

    def counting(buf):
        calls.append(len(buf))
        return real(buf)

    monkeypatch.setattr(compression, "lz4_compress", counting)
    head, body = Compression.parse("auto,lz4").encode(data)
    assert HEADER.unpack(head) == (NONE, len(data)) and body is data
    assert calls and max(calls) == compression.SAMPLE_LEN  # only samples were compressed
    assert sum(calls) <= len(data) // 50


@pytest.mark.parametrize("layout", ["rrrrrrrz", "zrrrrrrr", "rrrtrrrr", "rrrrrrrt"])
def test_auto_compresses_a_chunk_with_one_compressible_region(layout):
    """One region of 1/8 of the chunk that compresses is enough to compress it all."""
    data = _mixed(3, 4 * MiB, layout)
    head, body = Compression.parse("auto,lz4").encode(data)
    algo, n = HEADER.unpack(head)
    assert algo == LZ4 and n == len(data) and len(body) < len(data) * 0.95


def test_sealed_size_counts_bytes_of_every_part():
    s = Sealed([b"ab", bytearray(b"cde"), memoryview(b"fghi")])
    assert len(s) == 9 and bytes(s) == b"abcdefghi"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_none_repository_chunks_by_format_version(tmp_path, version):
    """Version 2 and 3 without encryption store untagged chunks, version 1 keeps the tag
    (older diskvaults read it); version 3 ids are made of block digests, 1 and 2 hash the
    plaintext; all restore byte for byte and damage is found."""
    from support import dv, init_repo

    from diskvault.crypto.ids import BlockIdHasher
    from diskvault.repository.repo import Repository

    path = str(tmp_path / "repo")
    env = init_repo(path, "none")
    if version < 3:  # a repository an older diskvault made
        with Repository.open(LocalStore(path), lambda creating: "", lock=None) as repo:
            repo.set_config("version", version)
    img = tmp_path / "img"
    img.write_bytes(_mixed(9, 3 * MiB, "rtz") + _mixed(10, 1 * MiB, "t"))
    dv("create", f"{path}::a", str(img), env=env)
    assert dv("extract", "--stdout", f"{path}::a", env=env).stdout == img.read_bytes()
    with Repository.open(LocalStore(path), lambda creating: "", lock=None) as repo:
        assert repo.format_version == version
        store = LocalStore(path)
        suites = set()
        plain_ids, block_ids = IdHasher(repo.key.id_key), BlockIdHasher(repo.key.id_key)
        for name, _size in store.list("packs"):
            pack = store.load(name)
            for e in parse_pack(pack, repo.codec, name.rsplit("/", 1)[1]):
                suites.add(pack[e.offset])
                data = repo.codec.open_chunk(e.id, pack[e.offset : e.offset + e.length])
                assert (block_ids if version == 3 else plain_ids)(data) == e.id
                assert (block_ids if version != 3 else plain_ids)(data) != e.id
        # data chunks untagged in version 2 (other objects, e.g. delta patches, keep suite 0)
        assert (SUITE_NONE_ID_CHECKED in suites) == (version >= 2) and suites <= {0, 2}
        # damage one stored chunk byte: check --verify-data names it, extract fails
        name = sorted(n for n, _ in store.list("packs"))[0]
        pack = bytearray(store.load(name))
        e = parse_pack(bytes(pack), repo.codec, None)[0]
        pack[e.offset + e.length // 2] ^= 0x10
        with open(os.path.join(path, name), "wb") as f:
            f.write(pack)
    r = dv("check", "--verify-data", f"{path}", env=env, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    r = dv("extract", "--stdout", f"{path}::a", env=env, check=False)
    # never wrong data: an error, or (a redundant lz4 stream) the right bytes
    assert b"Traceback" not in r.stderr
    assert r.returncode != 0 or r.stdout == img.read_bytes()


@pytest.mark.parametrize("second", [False, True])
def test_create_stores_every_v2_plain_chunk_untagged(tmp_path, second):
    """End to end, not just the codec: every chunk a ``create`` writes into a version 2
    ``-e none`` repository — data windows, delta patches (the second backup) and
    fingerprint chunks — is suite 2, so no tag pass and no sealing copy is paid. (A
    merge once routed data windows back through the tagged one-buffer ``seal``.)"""
    from support import dv, init_repo, make_vm_image

    img, repo = str(tmp_path / "vm.img"), str(tmp_path / "repo")
    make_vm_image(img, mib=12, seed=3)
    env = init_repo(repo, "none")
    dv("create", f"{repo}::a", img, env=env)
    if second:  # scattered 4 KiB changes: the windows become delta extents
        rnd = random.Random(4)
        with open(img, "r+b") as f:
            for i in range(0, 12 << 20, 1 << 20):
                f.seek(i + 8192)
                f.write(rnd.randbytes(4096))
        stats = json.loads(dv("create", "--json", f"{repo}::b", img, env=env).stdout)
        assert stats["archive"]["stats"]["delta_blocks"] > 0  # patches were written
    c = codec(False, untagged=True)
    packs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(repo, "packs"))
             for f in fs]
    objects = 0
    for path in packs:
        with open(path, "rb") as f:
            data = f.read()
        for e in parse_pack(data, c, os.path.basename(path)):
            objects += 1
            assert data[e.offset] == SUITE_NONE_ID_CHECKED, e
    assert objects >= 3
    out = dv("extract", "--stdout", f"{repo}::{'b' if second else 'a'}", env=env).stdout
    with open(img, "rb") as f:
        assert out == f.read()


@pytest.mark.parametrize("head_len,body_len", [(0, 0), (9, 1), (9, 15), (9, 4 * MiB), (3, 65537)])
def test_aes_gcm_parts_are_the_one_shot_seal_byte_for_byte(head_len, body_len):
    """seal_parts streams head and body into an uninitialised buffer: the stored bytes
    must be exactly ``seal(aad, head + body)`` with the same nonce (old readers and
    ``open`` read them), whatever the sizes around GCM's 16-byte blocks."""
    rnd = random.Random(head_len * 7 + body_len)
    head, body = rnd.randbytes(head_len), bytearray(rnd.randbytes(body_len))
    session = rnd.randbytes(16)
    a, b = AesGcmCipher(KEY, session), AesGcmCipher(KEY, session)  # same nonces
    for _ in range(2):  # the second seal: the next counter on both
        parts = a.seal_parts(b"aad", head, body)
        joined = b"".join(parts)
        assert joined == bytes(b.seal(b"aad", head + body))
        assert bytes(a.open(b"aad", joined, "x")) == head + body


@pytest.mark.parametrize("encrypted", [False, True])
def test_pack_toc_is_sealed_the_same_whatever_the_backup_compression(encrypted):
    """Repair rebuilds a pack whose TOC or trailer was damaged from its salvaged chunks,
    with the repository's default codec; only a TOC sealed independently of the backup's
    ``-C`` gives the same bytes, so the same name (the corruption sweep's tail cases).
    (Encrypted TOCs differ in their nonces: there the sealed sizes must agree.)"""
    blobs = [(os.urandom(32), os.urandom(100), 100) for _ in range(40)]
    packs = []
    for spec in ("none", "auto,lz4", "lz4", "zstd,3"):
        c = codec(encrypted, spec)
        w = PackWriter(1 << 20)
        for cid, blob, plain in blobs:
            w.add(cid, blob, plain)
        name, data, _ = w.finish(c)
        assert [e.id for e in parse_pack(data, c, name)] == [b[0] for b in blobs]
        packs.append(len(data) if encrypted else (name, data))
    assert all(p == packs[0] for p in packs), packs if encrypted else None
