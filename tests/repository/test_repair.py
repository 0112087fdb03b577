"""check --repair on damaged packs (in process, MemoryStore).

Packs are named by the BLAKE3 of their bytes. When the damage lies outside a pack's
chunks (trailer, table of contents), repair salvages every chunk and writes them, in
their order, into a new pack: the very bytes, and so the very name, of the pack it
replaces. Repair used to delete ("quarantine") the damaged pack after that, i.e. the
pack it had just rebuilt: the new index named a missing pack (issue 8, point 6).
"""

from __future__ import annotations

import random

import pytest
from faults.faultkit import assert_restores, backup, new_repo, reopen

from diskvault.archive.check import CheckOptions, run_check
from diskvault.archive.repair import repair
from diskvault.repository.lock import EXCLUSIVE
from diskvault.repository.pack import TRAILER, pack_key
from diskvault.storage.memory import MemoryStore


def _packs(store: MemoryStore) -> list[str]:
    return sorted(k for k in store.data if k.startswith("packs/"))


@pytest.mark.parametrize("encryption", ["none", "repokey"])
@pytest.mark.parametrize("where", ["trailer", "truncated trailer"])
def test_repair_of_a_pack_rebuilt_under_its_own_name(encryption, where):
    rng = random.Random(8)
    files = {"a.bin": rng.randbytes(100_000), "b.bin": rng.randbytes(60_000)}
    store = MemoryStore()
    # one chunk per pack: every pack is one whose chunks are all salvageable
    repo = new_repo(store, encryption, pack_size=1, random_bytes=random.Random(6).randbytes)
    backup(repo, "a", files)
    repo.close()
    base = dict(store.data)
    packs = _packs(store)
    assert len(packs) >= 8
    for key in packs:
        store.data = dict(base)
        v = store.data[key]
        damaged = store.data[key] = (
            v[:-TRAILER.size] + bytes([v[-TRAILER.size] ^ 1]) + v[-TRAILER.size + 1 :]
            if where == "trailer" else v[:-3])
        r = reopen(store, lock=EXCLUSIVE)
        try:
            assert not run_check(r, CheckOptions(verify_data=True)).ok
            log: list[str] = []
            after = repair(r, CheckOptions(verify_data=True), log.append)
            assert after.ok, (key, [p.message for p in after.problems], log)
            name = key.rsplit("/", 1)[-1]
            # the damaged bytes are kept aside; the pack itself is whole again or replaced
            assert store.data[f"quarantine/packs/{name}"] == damaged
            if encryption == "none":  # deterministic sealing: the same bytes again
                assert store.data[pack_key(name)] == base[key], log
                assert any("rebuilt intact" in m for m in log), log
            else:  # a new session seals the TOC anew: another name, the old one goes
                assert pack_key(name) not in store.data, log
            assert_restores(r, "a", files)
        finally:
            r.close()
        r = reopen(store, tolerate=False)  # the repaired repository opens and checks clean
        try:
            assert run_check(r, CheckOptions(verify_data=True)).ok
            assert_restores(r, "a", files)
        finally:
            r.close()
