"""Append-only repositories, and config changes that survive a crash half way."""

from __future__ import annotations

import os

import pytest
from faults.faultkit import assert_restores, backup, new_repo, reopen

from diskvault.archive.check import CheckOptions, run_check
from diskvault.archive.repair import repair
from diskvault.errors import AppendOnlyError, StorageError
from diskvault.repository.lock import EXCLUSIVE
from diskvault.repository.manifest import Manifest
from diskvault.storage.memory import MemoryStore


def test_a_writer_cannot_drop_archives_and_a_forged_manifest_is_undone():
    store = MemoryStore()
    repo = new_repo(store, append_only=True)
    files = {n: {f"{n}.bin": os.urandom(50_000)} for n in ("a", "b")}
    for n, f in files.items():
        backup(repo, n, f)
    with pytest.raises(AppendOnlyError):  # through the API: removal is refused
        repo.update_manifest(lambda m: m.archives.pop("a"))
    with pytest.raises(AppendOnlyError):
        repo.update_manifest(lambda m: m.archives.update(b=m.archives["a"]))
    # a hostile client with the key writes a manifest naming nothing ...
    repo.replace_manifest(Manifest())
    repo.close()
    repo = reopen(store, lock=EXCLUSIVE)
    assert not repo.manifest.archives
    # ... but append-only never deleted the archive metadata: repair lists it again
    repair(repo, CheckOptions(), lambda m: None, undelete=True)
    assert sorted(repo.manifest.archives) == ["a", "b"]
    for n, f in files.items():
        assert_restores(repo, n, f)
    assert run_check(repo, CheckOptions(verify_data=True)).ok
    repo.close()


class CrashAfter(MemoryStore):
    """Fails every store after the first ``n`` matching ``name`` (a crash from there on)."""

    def __init__(self) -> None:
        super().__init__()
        self.rule: tuple[str, int] | None = None

    def store(self, name, value):
        if self.rule and name == self.rule[0]:
            if self.rule[1] == 0:
                raise StorageError("crash")
            self.rule = (name, self.rule[1] - 1)
        super().store(name, value)


@pytest.mark.parametrize("crash", [("manifest", 0), ("config", 0), ("manifest", 1)])
def test_config_change_survives_a_crash_at_every_step(crash):
    store = CrashAfter()
    repo = new_repo(store, encryption="repokey")
    data = {"x": os.urandom(10_000)}
    backup(repo, "x", data)
    store.rule = crash
    with pytest.raises(StorageError):
        repo.set_config("append_only", True)
    repo.close()
    store.rule = None
    repo = reopen(store, tolerate=False)  # config and manifest still agree
    assert repo.append_only == (crash != ("config", 0) and crash != ("manifest", 0))
    assert_restores(repo, "x", data)
    repo.close()
    repo = reopen(store, lock=EXCLUSIVE, tolerate=False)
    repo.set_config("append_only", False)  # and the next change completes
    assert not reopen(store, lock=None, tolerate=False).append_only
    repo.close()
