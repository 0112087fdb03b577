"""The Store contract (storage/base.py), run against every backend.

``make`` gives a new, not yet created store; calling it again gives another handle on
the same location (a new connection for remote backends).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diskvault.errors import ObjectMissing, RepositoryExists, StorageError
from diskvault.storage.base import Store
from diskvault.storage.local import LocalStore
from diskvault.storage.memory import MemoryStore
from diskvault.storage.retry import RetryStore
from diskvault.storage.url import open_store

MiB = 1 << 20
BACKENDS = ["memory", "retry-memory", "local", "sftp", "s3"]
Make = Callable[[], Store]


def _shared(store: Store) -> Make:
    return lambda: store


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    kind = request.param
    opened: list[Store] = []
    factory: Make
    if kind == "memory":
        factory = _shared(MemoryStore())
    elif kind == "retry-memory":
        factory = _shared(RetryStore(MemoryStore(), sleep=lambda s: None))
    elif kind == "local":
        def factory() -> Store:
            return LocalStore(str(tmp_path / "repo"))
    elif kind == "sftp":
        server = request.getfixturevalue("sftp_server")
        server.configure_client(Path(os.environ["HOME"]))
        url = server.url(str(tmp_path / "repo"))

        def factory() -> Store:
            return open_store(url, retry=False)
    else:
        server = request.getfixturevalue("s3_server")
        url = server.url(f"contract-{uuid.uuid4().hex[:12]}/repo")

        def factory() -> Store:
            return open_store(url, retry=False)

    def tracked() -> Store:
        s = factory()
        opened.append(s)
        return s

    yield tracked
    for s in opened:
        s.close()


@pytest.fixture
def store(make: Make) -> Store:
    s = make()
    s.create()
    return s


def _blob(n: int, seed: int = 0) -> bytes:
    """Incompressible, distinct per seed (a server that dedups or compresses gains nothing)."""
    import random

    return random.Random(seed).randbytes(n)


def test_create_exists_and_refuse_second_create(make: Make) -> None:
    s = make()
    assert not s.exists()
    s.create()
    assert s.exists()
    s.store("config", b"cfg")
    again = make()
    assert again.exists()
    with pytest.raises(RepositoryExists):
        again.create()
    assert again.load("config") == b"cfg"  # the refused create changed nothing


@pytest.mark.parametrize("size", [0, 1, 40 * MiB])
def test_round_trip(store: Store, size: int) -> None:
    value = _blob(size, seed=size)
    store.store("packs/00/blob", value)
    assert store.load("packs/00/blob") == value
    assert store.size("packs/00/blob") == size


def test_store_accepts_bytearray_and_memoryview(store: Store) -> None:
    value = _blob(300_000)
    store.store("a", bytearray(value))
    store.store("b", memoryview(value)[1000:])
    assert store.load("a") == value
    assert store.load("b") == value[1000:]


def test_store_parts_writes_the_parts_in_order(store: Store) -> None:
    """Packs are stored from their objects' buffers (writev on a local disk)."""
    value = _blob(3 * MiB + 5, seed=3)
    cuts = [0, 0, 8, 9, 100, 1 << 20, 1 << 20, 3 * MiB, len(value)]
    parts = [value[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    parts[2] = bytearray(parts[2])
    parts[4] = memoryview(value)[cuts[4] : cuts[5]]
    store.store_parts("packs/0a/parts", parts)
    assert store.load("packs/0a/parts") == value
    assert store.size("packs/0a/parts") == len(value)
    store.store_parts("packs/0a/parts", [b"new"])  # replaces, like store
    assert store.load("packs/0a/parts") == b"new"


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 1), (0, 4096), (4095, 2), (100_000, 4096), (1, 200_000), (0, None), (70_000, None),
     (250_000, 10), (299_990, 100), (300_000, 5), (400_000, 5), (300_000, None), (5, 0)],
)
def test_range_load(store: Store, offset: int, size: int | None) -> None:
    value = _blob(300_000, seed=7)
    store.store("packs/aa/ranged", value)
    expected = value[offset:] if size is None else value[offset : offset + size]
    assert store.load("packs/aa/ranged", offset, size) == expected


def test_missing_names_raise_object_missing(store: Store) -> None:
    store.store("packs/ab/present", b"x")
    for call in (
        lambda: store.load("packs/ab/absent"),
        lambda: store.load("packs/ab/absent", 10, 4096),
        lambda: store.load("never/made/dir/x"),
        lambda: store.size("packs/ab/absent"),
        lambda: store.delete("packs/ab/absent"),
    ):
        with pytest.raises(ObjectMissing, match="absent|never"):
            call()


def test_delete(store: Store) -> None:
    store.store("locks/me", b"1")
    store.store("locks/other", b"2")
    store.delete("locks/me")
    with pytest.raises(ObjectMissing):
        store.load("locks/me")
    assert dict(store.list("locks")) == {"locks/other": 1}
    with pytest.raises(ObjectMissing):
        store.delete("locks/me")


def test_list_is_recursive_with_sizes(store: Store) -> None:
    names = {
        "config": 3, "manifest": 10, "keys/repokey": 7, "index/0a1b": 100,
        "archives/ff00": 42, "packs/ab/ab01": 1000, "packs/ab/ab02": 0, "packs/cd/cd01": 5,
    }
    for i, (name, n) in enumerate(names.items()):
        store.store(name, _blob(n, seed=i))
    assert dict(store.list("")) == names
    packs = {k: v for k, v in names.items() if k.startswith("packs/")}
    assert dict(store.list("packs")) == packs
    assert dict(store.list("packs/")) == packs
    assert dict(store.list("packs/ab")) == {"packs/ab/ab01": 1000, "packs/ab/ab02": 0}
    assert dict(store.list("pack")) == {}  # a prefix is a directory, not a string prefix
    assert dict(store.list("nothing/here")) == {}
    assert sorted(n for n, _ in store.list("")) == sorted(names)  # each name once


def test_deeply_nested_names(store: Store) -> None:
    names = ["a/b/c/d/e/f", "a/b/x", "a/y"]
    for n in names:
        store.store(n, n.encode())
    for n in names:
        assert store.load(n) == n.encode()
    assert sorted(n for n, _ in store.list("a")) == sorted(names)
    assert dict(store.list("a/b/c")) == {"a/b/c/d/e/f": 11}


def test_names_that_escape_are_refused(make: Make, request: pytest.FixtureRequest) -> None:
    if "memory" in request.node.callspec.params["make"]:
        pytest.skip("a dict has nothing to escape from")
    s = make()
    s.create()
    for bad in ("../outside", "a/../../outside", "/etc/passwd"):
        with pytest.raises(StorageError):
            s.store(bad, b"x")


def test_overwrite_is_atomic(store: Store) -> None:
    old, new = _blob(1 * MiB, seed=1), _blob(1 * MiB, seed=2)
    store.store("manifest", old)
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.load("manifest"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(10):
            store.store("manifest", new if i % 2 == 0 else old)
    finally:
        stop.set()
        t.join()
    assert store.load("manifest") == old
    assert seen, "the reader never ran"
    bad = [len(v) for v in seen if v not in (old, new)]
    assert not bad, f"{len(bad)} of {len(seen)} loads saw a torn value (lengths {bad[:5]})"
    assert [n for n, _ in store.list("")] == ["manifest"]  # no temp names leak


def test_concurrent_stores_and_loads(store: Store) -> None:
    threads, per_thread, size = 8, 6, 256 * 1024
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                store.store(f"packs/{t:02x}/{i:04x}", _blob(size, seed=t * 100 + i))
            barrier.wait()  # now read everyone's values, not only our own
            for i in range(per_thread):
                other = (t + i) % threads
                v = store.load(f"packs/{other:02x}/{i:04x}", 1000, 5000)
                assert v == _blob(size, seed=other * 100 + i)[1000:6000]
        except BaseException as e:  # reported by the main thread below
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
    listed = dict(store.list("packs"))
    assert len(listed) == threads * per_thread
    assert set(listed.values()) == {size}
