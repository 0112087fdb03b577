"""compact: what it frees, what it keeps, and when it refuses (in process, MemoryStore)."""

from __future__ import annotations

import os
import random

import pytest
from faults.faultkit import assert_restores, backup, new_repo, reopen

from diskvault.archive.check import CheckOptions, run_check
from diskvault.archive.refs import referenced_chunks
from diskvault.errors import AppendOnlyError, IntegrityError
from diskvault.repository.compact import compact
from diskvault.repository.lock import EXCLUSIVE
from diskvault.storage.memory import MemoryStore


def pack_bytes(store: MemoryStore) -> int:
    return sum(len(v) for k, v in store.data.items() if k.startswith("packs/"))


def run_compact(repo, threshold=0.1, dry_run=False):
    ids = {r.id for r in repo.manifest.archives.values()}
    return compact(repo, referenced_chunks(repo), ids, threshold, dry_run=dry_run)


@pytest.fixture
def repo():
    store = MemoryStore()
    r = new_repo(store, pack_size=96 << 10)
    yield r
    r.close()


def test_deleted_archive_is_freed_and_the_rest_restores(repo):
    rng = random.Random(1)
    keep = {"keep.bin": rng.randbytes(300_000)}
    gone = {"gone.bin": rng.randbytes(400_000)}
    backup(repo, "keep", keep)
    backup(repo, "gone", gone)
    repo.delete_archives(["gone"])
    before = pack_bytes(repo.store)
    dry = run_compact(repo, dry_run=True)
    assert pack_bytes(repo.store) == before and dry.bytes_freed >= 380_000
    st = run_compact(repo)
    assert before - pack_bytes(repo.store) >= 380_000
    assert st.bytes_freed > 380_000 and st.segments_replaced == 2
    assert len([k for k in repo.store.data if k.startswith("index/")]) == 1
    assert not [k for k in repo.store.data if k.startswith("archives/")
                and bytes.fromhex(k[9:]) not in {r.id for r in repo.manifest.archives.values()}]
    assert run_check(repo, CheckOptions(verify_data=True)).ok
    assert_restores(repo, "keep", keep)
    again = run_compact(repo)  # nothing left to do
    assert again.packs_deleted == again.packs_repacked == again.segments_replaced == 0


def test_threshold_decides_which_partly_used_packs_are_repacked():
    store = MemoryStore()
    repo = new_repo(store, pack_size=1 << 20)  # one pack holds both archives
    a, b = {"a": os.urandom(450_000)}, {"b": os.urandom(50_000)}
    backup(repo, "both", {**a, **b})
    backup(repo, "a", a)
    repo.delete_archives(["both"])  # b's ~50 kB are now garbage in a ~500 kB pack
    st = run_compact(repo, threshold=0.2)
    assert st.packs_repacked == 0
    st = run_compact(repo, threshold=0.05)
    assert st.packs_repacked >= 1 and st.bytes_freed > 40_000
    assert_restores(repo, "a", a)
    assert run_check(repo, CheckOptions(verify_data=True)).ok


def test_duplicates_of_concurrent_writers_are_collected():
    store = MemoryStore()
    new_repo(store, pack_size=64 << 10).close()
    data = {"same.bin": os.urandom(300_000)}
    r1, r2 = reopen(store), reopen(store)
    assert len(r1.index) == len(r2.index) == 0  # both load the index before either writes
    backup(r1, "one", data)
    backup(r2, "two", data)  # the same chunks again: its index did not know them
    r1.close()
    r2.close()
    repo = reopen(store, lock=EXCLUSIVE)
    before = pack_bytes(store)
    run_compact(repo)
    assert pack_bytes(store) < before * 0.6
    assert_restores(repo, "one", data)
    assert_restores(repo, "two", data)
    assert run_check(repo, CheckOptions(verify_data=True)).ok
    repo.close()


def test_refuses_what_it_cannot_judge(repo):
    backup(repo, "a", {"a": os.urandom(200_000)})
    backup(repo, "b", {"b": os.urandom(200_000)})
    meta = next(k for k in repo.store.data if k.startswith("archives/"))
    repo.store.data[meta] = repo.store.data[meta][:-1]
    packs_before = dict(repo.store.data)
    with pytest.raises(IntegrityError, match="cannot tell which chunks are in use"):
        run_compact(repo)
    pack = next(k for k in repo.store.data if k.startswith("packs/"))
    repo.store.data[meta] = packs_before[meta]
    repo.store.data[pack] = repo.store.data[pack][:-3]  # its TOC is now unreadable
    with pytest.raises(IntegrityError, match="check --repair"):
        run_compact(repo)
    assert {k for k in repo.store.data if k.startswith("packs/")} == \
        {k for k in packs_before if k.startswith("packs/")}


def test_append_only_refuses():
    store = MemoryStore()
    repo = new_repo(store, append_only=True)
    backup(repo, "a", {"a": os.urandom(1000)})
    with pytest.raises(AppendOnlyError):
        run_compact(repo)
    with pytest.raises(AppendOnlyError):
        repo.delete_archives(["a"])
    with pytest.raises(AppendOnlyError):
        repo.rename_archive("a", "b")
    repo.close()
