"""Disk full during a backup: one clear error line, repository consistent, earlier
archives intact, the space reclaimed by ``compact``."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from faults.faultkit import assert_restores, backup, new_repo, reopen
from support import dv, needs_root, needs_tool

from diskvault.archive.check import CheckOptions, run_check
from diskvault.archive.refs import referenced_chunks
from diskvault.errors import StorageFull
from diskvault.repository.compact import compact
from diskvault.repository.lock import EXCLUSIVE
from diskvault.storage.faults import FaultStore
from diskvault.storage.memory import MemoryStore


def _used(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@needs_root
@needs_tool("mount", "umount")
def test_tmpfs_fills_during_create(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True)
    try:
        repo = str(mnt / "repo")
        env = {"DISKVAULT_PASSPHRASE": "pw"}
        dv("init", "-e", "repokey", "--pack-size", "512KiB", repo, env=env)
        first = os.urandom(1 << 20)
        (tmp_path / "first").write_bytes(first)
        dv("create", f"{repo}::first", str(tmp_path / "first"), env=env)
        (tmp_path / "big").write_bytes(os.urandom(12 << 20))
        r = dv("create", f"{repo}::big", str(tmp_path / "big"), env=env, check=False)
        err = r.stderr.decode()
        assert r.returncode == 2 and "Traceback" not in err, err
        assert err.count("\n") == 1 and err.startswith("diskvault: error: no space left"), err
        assert shutil.disk_usage(mnt).free < 1 << 20  # it really filled up
        filled = _used(repo)
        # consistent: leftovers of the failed backup are notes, not problems
        r = dv("check", "--verify-data", repo, env=env)
        assert b"no problems found" in r.stdout and b"in no index segment" in r.stdout
        assert dv("extract", "--stdout", f"{repo}::first", env=env).stdout == first
        assert dv("list", "--short", repo, env=env).stdout.split() == [b"first"]
        out = dv("compact", repo, env=env).stdout.decode()
        assert "freed" in out
        assert _used(repo) < filled - (3 << 20), (filled, _used(repo))
        again = os.urandom(2 << 20)
        (tmp_path / "again").write_bytes(again)
        dv("create", f"{repo}::again", str(tmp_path / "again"), env=env)
        assert dv("extract", "--stdout", f"{repo}::again", env=env).stdout == again
        assert dv("extract", "--stdout", f"{repo}::first", env=env).stdout == first
        assert dv("check", "--verify-data", repo, env=env).returncode == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_store_in_process_compact_still_frees_space():
    # the same on any machine: the store refuses packs past a quota, and stays full
    store = FaultStore(MemoryStore())
    repo = new_repo(store, pack_size=32 << 10)
    first = {"first": os.urandom(200_000)}
    backup(repo, "first", first)
    stored = sum(len(v) for k, v in store.inner.data.items() if k.startswith("packs/"))
    store.full("store", "packs/*", after_bytes=stored + (300 << 10))
    with pytest.raises(StorageFull):
        backup(repo, "big", {"big": os.urandom(2 << 20)})
    repo.close()
    repo = reopen(store, lock=EXCLUSIVE)
    report = run_check(repo, CheckOptions(verify_data=True))
    assert report.ok and report.repo_check and report.repo_check.uncovered
    assert_restores(repo, "first", first)
    before = sum(len(v) for k, v in store.inner.data.items() if k.startswith("packs/"))
    st = compact(repo, referenced_chunks(repo), {r.id for r in repo.manifest.archives.values()},
                 threshold=0.0)
    after = sum(len(v) for k, v in store.inner.data.items() if k.startswith("packs/"))
    assert st.packs_deleted > 0 and after < before - (200 << 10)
    assert run_check(repo, CheckOptions(verify_data=True)).ok
    assert_restores(repo, "first", first)
