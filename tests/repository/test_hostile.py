"""Hostile repository input (Hypothesis): every parser of repository data — object headers,
compression, packs, index segments, manifest, config, archive metadata, item streams, key
files, lock records — and check/repair over a whole repository with one object replaced.

Only clean DiskvaultError subclasses may come out; never another exception, never more
than a bounded amount of memory (traced) or time (Hypothesis deadline).
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from diskvault.archive.check import CheckOptions, read_items_robust, run_check
from diskvault.archive.model import Item, unpack_items
from diskvault.archive.repair import repair
from diskvault.archive.view import ArchiveView
from diskvault.crypto.aead import AesGcmCipher, PlainCipher
from diskvault.crypto.ids import IdHasher
from diskvault.crypto.keys import KeyMaterial, parse_keyfile_text, unwrap_key, wrap_key
from diskvault.errors import DiskvaultError, IntegrityError
from diskvault.repository.compression import Compression, decompress
from diskvault.repository.index import ChunkIndex
from diskvault.repository.keymanage import export_text, parse_export
from diskvault.repository.lock import EXCLUSIVE, Lock, read_locks
from diskvault.repository.manifest import ArchiveRef, Manifest
from diskvault.repository.objects import ObjectCodec
from diskvault.repository.pack import (
    MAGIC,
    TOC_AAD,
    TRAILER,
    TRAILER_MAGIC,
    PackWriter,
    parse_pack,
    read_toc,
)
from diskvault.repository.repo import Repository
from diskvault.storage.memory import MemoryStore

LIMIT = 64 << 20  # traced bytes one parse may allocate (the format's own caps are higher
DECOMPRESS_LIMIT = 300 << 20  # only for decompress: objects may be up to 256 MiB)
# derandomize: the same examples on every run (a sweep that fails on some runs only hides
# a bug); no deadline: wall time on a busy CI machine says nothing (memory is bounded below)
FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# msgpack values of every kind, nested: what a hostile object decodes to
ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can encode
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(),
                    st.binary(max_size=40), st.text(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(
    st.lists(c, max_size=5), st.dictionaries(st.one_of(st.text(max_size=12), st.binary(max_size=4),
                                                      ints), c, max_size=6)),
    max_leaves=20)


def clean(fn: Callable[[], object], limit: int = LIMIT) -> None:
    """Run ``fn``: it may succeed or raise a DiskvaultError, within ``limit`` traced bytes."""
    tracemalloc.start()
    try:
        fn()
    except DiskvaultError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < limit, f"{peak} bytes allocated"


def packb(v: object) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def mutate(data: bytes, how: tuple[int, int, int]) -> bytes:
    kind, pos, val = how
    if not data:
        return data
    pos %= len(data)
    if kind == 0:
        return data[:pos] + bytes([val % 256]) + data[pos + 1 :]
    if kind == 1:
        return data[:pos]
    return data[:pos] + data[pos : pos + 8] * (val % 5) + data[pos:]


mutations = st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 10**6))
codecs = [ObjectCodec(PlainCipher(), IdHasher(b"k" * 32), Compression.parse("lz4")),
          ObjectCodec(AesGcmCipher(b"e" * 32), IdHasher(b"k" * 32), Compression.parse("lz4"))]


@FAST
@given(blob=st.binary(max_size=300), enc=st.integers(0, 1), hostile=values)
def test_object_headers_and_compression(blob, enc, hostile):
    c = codecs[enc]
    clean(lambda: c.open(b"x", blob))
    clean(lambda: c.open_chunk(b"x" * 32, blob))
    sealed = c.seal(b"aad", packb(hostile))
    clean(lambda: c.open(b"aad", sealed))
    clean(lambda: decompress(blob, "fuzz"), DECOMPRESS_LIMIT)


@FAST
@given(chunks=st.lists(st.binary(min_size=1, max_size=500), min_size=1, max_size=5),
       how=mutations, garbage=st.binary(max_size=200), enc=st.integers(0, 1),
       toc=st.one_of(values, st.lists(st.lists(values, max_size=5), max_size=4)))
def test_packs(chunks, how, garbage, enc, toc):
    c = codecs[enc]
    w = PackWriter(1 << 20)
    for d in chunks:
        w.add(c.id_hash(d), c.seal(c.id_hash(d), d), len(d))
    name, data, _ = w.finish(c)
    bad = mutate(data, how)
    clean(lambda: parse_pack(bad, c, name))
    clean(lambda: parse_pack(garbage, c, None))
    clean(lambda: read_toc(lambda _k, o=0, n=None: bad[o : o + n], name, len(bad), c))
    # a TOC that authenticates but says anything at all
    toc_blob = c.seal(TOC_AAD, packb(toc))
    off = len(MAGIC) + len(garbage)
    hostile = MAGIC + garbage + toc_blob + TRAILER.pack(off, len(toc_blob), TRAILER_MAGIC)
    clean(lambda: parse_pack(hostile, c, None))


@FAST
@given(raw=st.binary(max_size=300), hostile=values, keys=st.binary(max_size=100),
       vals=st.binary(max_size=100), packs=st.lists(values, max_size=4))
def test_index_segments(raw, hostile, keys, vals, packs):
    clean(lambda: ChunkIndex.from_bytes(raw))
    clean(lambda: ChunkIndex.from_bytes(packb(hostile)))
    d = {"version": 1, "packs": packs, "keys": keys, "vals": vals}
    clean(lambda: ChunkIndex.from_bytes(packb(d)))


@FAST
@given(raw=st.binary(max_size=300), hostile=values, archives=st.lists(values, max_size=4),
       fields=st.dictionaries(st.sampled_from(["serial", "time", "config_hash",
                                               "pending_config_hash"]), values))
def test_manifest(raw, hostile, archives, fields):
    clean(lambda: Manifest.from_bytes(raw))
    clean(lambda: Manifest.from_bytes(packb(hostile)))
    good = {"version": 1, "serial": 1, "time": 1.0, "config_hash": b"h" * 32,
            "archives": archives}
    clean(lambda: Manifest.from_bytes(packb({**good, **fields})))


@FAST
@given(raw=st.binary(max_size=200), hostile=values)
def test_config(raw, hostile):
    for data in (raw, packb(hostile), packb({"version": 1, "repo_id": hostile,
                                             "encryption": "none"})):
        s = MemoryStore()
        s.store("config", data)
        clean(lambda s=s: Repository.read_config(s))


item_dicts = st.fixed_dictionaries({"path": st.one_of(st.text(max_size=10), values)}, optional={
    k: values for k in ("type", "mode", "size", "extents", "health", "xattrs", "uid", "stats")})


@FAST
@given(raw=st.binary(max_size=400), items=st.lists(item_dicts, max_size=4),
       extents=st.binary(max_size=120))
@example(raw=b"\x81\x81\x01\x02\x03", items=[], extents=b"")  # a map as a map key
def test_item_streams(raw, items, extents):
    def consume(data: bytes) -> None:
        for it in unpack_items(data):
            if it.extents is not None:
                it.extents.total()

    clean(lambda: consume(raw))
    clean(lambda: consume(b"".join(packb(i) for i in items)))
    clean(lambda: consume(packb({"path": "p", "size": 1, "extents": extents})))
    stream = b"".join(packb(i) for i in items) + raw
    clean(lambda: read_items_robust([b"a" * 32, b"b" * 32],
                                    lambda c: stream if c[0] == 97 else raw))


@FAST
@given(meta=st.dictionaries(st.sampled_from(["version", "items", "name", "time", "stats",
                                             "repaired", "nitems"]), values),
       items=st.lists(st.binary(min_size=30, max_size=34), max_size=3))
def test_archive_metadata(meta, items):
    repo = _tiny_repo()
    for m in (meta, {**meta, "version": 1, "items": items}):
        aid = repo.store_archive_meta(m)
        ref = ArchiveRef("hostile", aid, 0.0)
        repo.manifest.archives = {"hostile": ref}

        def use() -> None:
            assert isinstance(ArchiveView.open(repo, "hostile").items, list)

        clean(use)
        clean(lambda: run_check(repo, CheckOptions()))


@FAST
@given(text=st.text(max_size=300), blob=st.binary(max_size=300), how=mutations,
       hostile=values)
def test_key_files_and_exports(text, blob, how, hostile):
    clean(lambda: parse_keyfile_text(text))
    clean(lambda: parse_export(text))
    clean(lambda: unwrap_key(blob, None, "pw"))
    clean(lambda: unwrap_key(packb(hostile), None, "pw"))
    good = wrap_key(KeyMaterial.generate(), b"r" * 32, "pw")
    clean(lambda: unwrap_key(mutate(good, how), b"r" * 32, "pw"))
    paper = export_text(good, b"r" * 32, paper=True)
    clean(lambda: parse_export(mutate(paper.encode(), how).decode(errors="replace")))


@FAST
@given(records=st.lists(st.one_of(st.binary(max_size=60), values.map(packb),
                                  values.map(lambda v: repr(v).encode())), max_size=4))
def test_lock_records(records):
    s = MemoryStore()
    for i, r in enumerate(records):
        s.store(f"locks/{i}", r)
    clean(lambda: read_locks(s))
    clean(lambda: Lock(s, EXCLUSIVE, lock_wait=0).acquire().release())


_BASE: dict[str, bytes] = {}


def _tiny_repo() -> Repository:
    s = MemoryStore()
    return Repository.init(s, "none", lambda _c: "", pack_size=4096)


def _base_store() -> dict[str, bytes]:
    if not _BASE:
        from faults.faultkit import backup

        repo = Repository.init(MemoryStore(), "none", lambda _c: "", pack_size=8192)
        backup(repo, "a", {"f": os.urandom(20000) + bytes(8192) + b"x" * 9000}, chunk=4096)
        backup(repo, "b", {"g": os.urandom(5000)}, chunk=4096)
        repo.close()
        _BASE.update(repo.store.data)  # type: ignore[attr-defined]
    return _BASE


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(pick=st.integers(0, 10**6), replacement=st.one_of(st.binary(max_size=300),
                                                         values.map(packb)), how=mutations,
       use_mutation=st.booleans())
def test_check_and_repair_of_a_hostile_repository(pick, replacement, how, use_mutation,
                                                  tmp_path_factory):
    # an unencrypted repository: its checksums are no defence against a forger
    os.environ["DISKVAULT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    data = dict(_base_store())
    names = sorted(n for n in data if n != "config")
    name = names[pick % len(names)]
    data[name] = mutate(data[name], how) if use_mutation else replacement
    store = MemoryStore()
    store.created = True
    store.data = data

    def go() -> None:
        repo = Repository.open(store, lambda _c: "", lock=EXCLUSIVE, tolerate_damage=True)
        try:
            run_check(repo, CheckOptions(verify_data=True))
            repair(repo, CheckOptions(verify_data=True), lambda _m: None)
        finally:
            repo.close()

    clean(go)


def test_item_from_hostile_dict_is_refused_cheaply():
    # a count where bytes are expected must not turn into an allocation of that size
    for bad in ({"path": "p", "extents": 10**9}, {"path": "p", "extents": [1, 2]},
                {"path": "p", "size": "x"}, {"path": 5}):
        tracemalloc.start()
        try:
            with pytest.raises(IntegrityError):
                Item.from_dict(bad)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < LIMIT, (bad, peak)
