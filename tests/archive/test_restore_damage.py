"""Restoring past damage (``--continue-on-error``) and keeping an existing image sparse.

A real GPT disk image with an ext4 partition (tests/archive/test_disk_images.py) is
backed up (in-process, through the same functions `disk backup` runs); then one chunk
of the ext4 partition is destroyed in its pack. `disk restore` and `extract --stdout`
with --continue-on-error must give back every other byte exactly — compared with a
restore made before the damage — list the damaged range, and read zeros there.
"""

from __future__ import annotations

import os
import random

import pytest
from archive.test_disk_images import MiB, make_disk, needs_kit
from support import allocated, dv, init_repo

from diskvault.archive.create import CreateOptions
from diskvault.archive.disk import DiskSource, backup_disk, plan_backup
from diskvault.archive.view import ArchiveView
from diskvault.repository.pack import pack_key
from diskvault.repository.repo import Repository
from diskvault.source.content import DATA
from diskvault.storage.local import LocalStore

pytestmark = [needs_kit]
SIZE = 24 * MiB


@pytest.fixture(scope="module")
def disk_repo(tmp_path_factory):
    """(repo, env, intact restore, partition item path, damaged disk range)."""
    tmp = tmp_path_factory.mktemp("damage")
    disk = make_disk(tmp, "gpt", [(1, 1, 16, "ext4")], SIZE, seed=7)
    repo = str(tmp / "repo")
    env = init_repo(repo, "repokey")
    with Repository.open(LocalStore(repo), lambda _c: env["DISKVAULT_PASSPHRASE"]) as r:
        src = DiskSource.open(disk.path)
        try:
            backup_disk(r, "d", plan_backup(src), CreateOptions())
        finally:
            src.close()
    intact = str(tmp / "intact.img")
    dv("disk", "restore", f"{repo}::d", intact, env=env)
    with Repository.open(LocalStore(repo), lambda _c: env["DISKVAULT_PASSPHRASE"]) as r:
        part = next(i for i in ArchiveView.open(r, "d").items if i.partition == 1)
        assert part.extents is not None
        runs, off = [], 0
        for kind, n, cid in part.extents:
            if kind == DATA:
                runs.append((off, n, cid))
            off += n
        ids = [c for _, _, c in runs]
        # a chunk in the middle of the filesystem that occurs once in the disk
        first, n, cid = next(x for x in runs[len(runs) // 2:] if ids.count(x[2]) == 1)
        loc = r.index.get(cid)
        assert loc is not None
    pack = os.path.join(repo, pack_key(loc.pack))
    with open(pack, "r+b") as f:  # destroy the chunk's bytes in its pack
        f.seek(loc.offset)
        f.write(random.Random(3).randbytes(loc.length))
    start = (part.disk_offset or 0) + first
    return repo, env, intact, part.path, (start, n), cid


def _assert_same_but_zeros(path: str, intact: str, rng: tuple[int, int]) -> None:
    start, n = rng
    with open(path, "rb") as a, open(intact, "rb") as b:
        got, want = a.read(), b.read()
    assert len(got) == len(want)
    assert got[:start] == want[:start]
    assert got[start + n :] == want[start + n :]
    assert got[start : start + n] == bytes(n)
    assert want[start : start + n] != bytes(n)  # the range really held data


def _check_report(stderr: bytes, item_path: str, first: int, n: int, cid: bytes) -> None:
    lines = stderr.decode().splitlines()
    damaged = [x for x in lines if "unreadable" in x]
    assert len(damaged) == 1, lines
    assert f"{item_path}: bytes {first}-{first + n - 1}" in damaged[0]
    assert cid.hex() in damaged[0]
    assert all(x.startswith("diskvault: warning: ") for x in lines), lines


def test_disk_restore_continues_past_a_destroyed_chunk(disk_repo, tmp_path):
    repo, env, intact, item_path, rng, cid = disk_repo
    target = str(tmp_path / "t.img")
    r = dv("disk", "restore", f"{repo}::d", target, env=env, check=False)
    assert r.returncode == 2 and b"cannot be restored" in r.stderr
    assert not os.path.exists(target)  # a new image that failed is removed
    r = dv("disk", "restore", "--continue-on-error", f"{repo}::d", target, env=env,
           check=False)
    assert r.returncode == 1, r.stderr
    start_in_item = rng[0] - 1 * MiB  # the partition starts at 1 MiB
    _check_report(r.stderr, item_path, start_in_item, rng[1], cid)
    _assert_same_but_zeros(target, intact, rng)


def test_extract_stdout_continues_past_a_destroyed_chunk(disk_repo, tmp_path):
    repo, env, intact, item_path, rng, cid = disk_repo
    r = dv("extract", "--stdout", f"{repo}::d", item_path, env=env, check=False)
    assert r.returncode == 2 and len(r.stdout) < rng[0] - 1 * MiB + 1
    r = dv("extract", "--stdout", "--continue-on-error", f"{repo}::d", item_path, env=env,
           check=False)
    assert r.returncode == 1, r.stderr
    _check_report(r.stderr, item_path, rng[0] - 1 * MiB, rng[1], cid)
    out = tmp_path / "part.img"
    out.write_bytes(r.stdout)
    part = tmp_path / "intact-part.img"
    with open(intact, "rb") as f:
        f.seek(1 * MiB)
        part.write_bytes(f.read(16 * MiB))
    _assert_same_but_zeros(str(out), str(part), (rng[0] - 1 * MiB, rng[1]))


def test_extract_tree_continues_past_a_destroyed_chunk(disk_repo, tmp_path):
    repo, env, intact, item_path, rng, cid = disk_repo
    dest = tmp_path / "tree"
    dest.mkdir()
    r = dv("extract", "--sparse", "--continue-on-error", f"{repo}::d", item_path, env=env,
           cwd=str(dest), check=False)
    assert r.returncode == 1, r.stderr
    _check_report(r.stderr, item_path, rng[0] - 1 * MiB, rng[1], cid)
    part = tmp_path / "intact-part.img"
    with open(intact, "rb") as f:
        f.seek(1 * MiB)
        part.write_bytes(f.read(16 * MiB))
    _assert_same_but_zeros(str(dest / item_path), str(part), (rng[0] - 1 * MiB, rng[1]))


def test_restore_into_an_existing_image_keeps_it_sparse(disk_repo, tmp_path):
    repo, env, intact, _item, _rng, _cid = disk_repo
    # the target: an existing, fully allocated image of stale random bytes (no table)
    target = str(tmp_path / "old.img")
    with open(target, "wb") as f:
        f.write(random.Random(5).randbytes(SIZE))
    assert allocated(target) >= SIZE
    r = dv("disk", "restore", "--continue-on-error", f"{repo}::d", target, env=env,
           check=False)
    assert r.returncode == 1, r.stderr
    with open(target, "rb") as a, open(intact, "rb") as b:
        got, want = a.read(), b.read()
    start, n = _rng
    assert got[:start] == want[:start] and got[start + n :] == want[start + n :]
    # as sparse as a restore into a new file: the stale bytes became holes, not zeros
    assert allocated(target) <= allocated(intact) + 1 * MiB, \
        (allocated(target), allocated(intact))
    assert allocated(intact) < SIZE // 2
