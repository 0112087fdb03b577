"""The local cache: validated against the repository, never trusted blindly."""

from __future__ import annotations

import os

from support import CountingStore

from diskvault.archive.create import CreateOptions, create_archive
from diskvault.repository.cache import RepoCache
from diskvault.repository.index import ChunkIndex
from diskvault.repository.repo import Repository
from diskvault.source.content import StreamContent
from diskvault.source.paths import Meta, Source
from diskvault.storage.local import LocalStore


def backup(repo: Repository, name: str, data: bytes) -> None:
    it = iter([data])
    src = Source(Meta(path=name), StreamContent(lambda n: next(it, b""), what=name))
    create_archive(repo, name, [src], CreateOptions())


def entries(idx: ChunkIndex) -> dict:
    return dict(idx.items())


def test_cache_downloads_only_new_segments_and_matches_a_full_load(tmp_path):
    store = CountingStore(str(tmp_path / "repo"))
    repo = Repository.init(store, "repokey", lambda c: "pw", pack_size=1 << 20)
    backup(repo, "a", os.urandom(3 << 20))
    repo.close()

    def segment_loader(r):
        return lambda name: ChunkIndex.from_bytes(r.codec.open(name.encode(),
                                                               r.store.load(name), name))

    repo = Repository.open(store, lambda c: "pw")
    cache = RepoCache(repo.id, repo.codec)
    first = cache.load_index(store, segment_loader(repo))
    assert entries(first) == entries(repo.load_index())
    repo.cache = RepoCache(repo.id, repo.codec, enabled=False)  # "b" comes from another host
    backup(repo, "b", os.urandom(2 << 20))
    store.loads.clear()
    second = cache.load_index(store, segment_loader(repo))
    index_loads = [n for n in store.loads if n.startswith("index/")]
    assert len(index_loads) == 1  # only the new session's segment
    assert entries(second) == entries(repo.load_index())
    # a damaged cache file is ignored and rebuilt
    path = os.path.join(cache.dir, "index")
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"\xff\xff\xff")
    third = cache.load_index(store, segment_loader(repo))
    assert entries(third) == entries(repo.load_index())
    repo.close()


def test_cache_drops_packs_that_vanished(tmp_path):
    store = LocalStore(str(tmp_path / "repo"))
    repo = Repository.init(store, "none", lambda c: "", pack_size=1 << 20)
    w = repo.writer()
    data = os.urandom(100000)
    cid = repo.id_hash(data)
    w.add(cid, repo.codec.seal(cid, data), len(data))
    w.flush()  # a pack with no index segment: an interrupted session's orphan
    cache = RepoCache(repo.id, repo.codec)
    idx = cache.load_index(store, lambda n: ChunkIndex())
    assert cid in idx
    for name, _ in list(store.list("packs")):
        store.delete(name)
    idx = cache.load_index(store, lambda n: ChunkIndex())
    assert cid not in idx
    repo.close()


def test_archive_blob_cache_is_still_authenticated(tmp_path):
    store = CountingStore(str(tmp_path / "repo"), remote=True)  # metadata is cached if remote
    repo = Repository.init(store, "repokey", lambda c: "pw")
    backup(repo, "a", b"hello" * 1000)
    ref = repo.manifest.archives["a"]
    cache = RepoCache(repo.id, repo.codec)
    blob = cache.archive_blob(store, ref.id)
    assert blob == store.load(f"archives/{ref.id.hex()}")
    store.delete(f"archives/{ref.id.hex()}")
    assert cache.archive_blob(store, ref.id) == blob  # served from the cache
    repo.close()


def test_orphan_packs_stay_indexed_and_their_toc_is_read_once(tmp_path):
    store = CountingStore(str(tmp_path / "repo"))
    repo = Repository.init(store, "none", lambda c: "", pack_size=1 << 20)
    w = repo.writer()
    data = os.urandom(100000)
    cid = repo.id_hash(data)
    w.add(cid, repo.codec.seal(cid, data), len(data))
    w.flush()  # no segment: an orphan, found by its TOC
    cache = RepoCache(repo.id, repo.codec)
    store.loads.clear()
    for _ in range(3):
        idx = cache.load_index(store, lambda n: ChunkIndex())
        assert cid in idx and cache.orphans
    assert sum(n.startswith("packs/") for n in store.loads) == 2  # trailer + TOC, once
    repo.close()
