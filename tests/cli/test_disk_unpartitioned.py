"""`disk backup` and unpartitioned space (issue 8, point 9), run as a user would.

A disk re-partitioned smaller keeps its old data after the last partition: stale bytes
that used to be most of the repository. By default a gap larger than 1 MiB after the
first partition is ``unused`` (not read, not stored, restored as zeros or holes);
``--keep-unpartitioned`` stores it. What boot loaders need stays: everything before the
first partition, the table structures, small gaps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from archive.test_disk_images import (
    MiB,
    assert_only_zeroed,
    make_disk,
    needs_kit,
    random_fill,
    run,
    sha256_range,
    verify_disk,
)
from support import allocated, dv, init_repo, loop_device, needs_loop, needs_tool

from diskvault.archive.disk import KEEP_GAP, UNPARTITIONED_KEPT, UNPARTITIONED_UNUSED

pytestmark = [needs_kit, needs_tool("sgdisk", "e2fsck", "fsck.vfat")]

# 1 MiB before the first partition (kept whatever its size), ext4, a 1 MiB gap (kept),
# FAT, then ~22 MiB of stale random data up to the backup GPT
SPEC = [(1, 1, 16, "ext4"), (2, 18, 10, "vfat")]
SIZE = 52 * MiB
TAIL = 28 * MiB  # where the large gap starts


def disk_backup(source: str, location: str, *opts: str) -> str:
    """The one place that knows disk backup's argument order."""
    return dv("disk", "backup", *opts, location, source).stdout.decode()


@pytest.fixture(scope="module")
def stale(tmp_path_factory) -> object:
    return make_disk(tmp_path_factory.mktemp("stale"), "gpt", SPEC, SIZE, seed=9)


def _items(j: dict) -> dict[str, dict]:
    return {i["path"]: i for i in j["archive"]["items"]}


@needs_loop
def test_large_gaps_are_unused_by_default_and_kept_on_request(stale, tmp_path: Path):
    disk = stale
    plain, keep = str(tmp_path / "plain"), str(tmp_path / "keep")
    init_repo(plain)
    init_repo(keep)
    with loop_device(disk.path, read_only=True) as dev:
        a = json.loads(disk_backup(dev, f"{plain}::a", "--json"))
        b = json.loads(disk_backup(dev, f"{keep}::b", "--json", "--keep-unpartitioned"))
    ia, ib = _items(a), _items(b)
    tail = ia[f"disk/gap-{TAIL}"]
    tail_size = tail["size"]
    assert tail_size > 20 * MiB
    assert tail["note"] == UNPARTITIONED_UNUSED and tail["unused"] == tail_size
    assert tail["read"] == 0 and tail["stored"] == 0
    assert ib[f"disk/gap-{TAIL}"]["note"] == UNPARTITIONED_KEPT
    assert ib[f"disk/gap-{TAIL}"]["read"] == tail_size
    # what boot loaders need is read whole: the space before partition 1, the 1 MiB gap
    head, small = ia["disk/gap-17408"], ia[f"disk/gap-{17 * MiB}"]
    assert small["size"] == KEEP_GAP and not small["note"] and small["read"] == KEEP_GAP
    assert not head["note"] and head["read"] == head["size"]
    assert a["archive"]["disk"]["keep_unpartitioned"] is False
    assert b["archive"]["disk"]["keep_unpartitioned"] is True
    # the stale random tail was most of what --keep-unpartitioned stored
    sa, sb = a["archive"]["stats"]["new_stored"], b["archive"]["stats"]["new_stored"]
    assert sb - sa > tail_size - MiB, (sa, sb)
    assert sa < sb / 2, (sa, sb)

    # info and --stats say which was done
    info = dv("info", f"{plain}::a").stdout.decode()
    assert f"disk/gap-{TAIL}" in info and UNPARTITIONED_UNUSED in info, info
    out = disk_backup(disk.path, f"{keep}::b2", "--stats", "--keep-unpartitioned")
    assert f"disk/gap-{TAIL}" in out and UNPARTITIONED_KEPT in out, out

    # default: a valid disk whose tail is zeros (holes in a new image)
    new = str(tmp_path / "new.img")
    dv("disk", "restore", f"{plain}::a", new)
    run("sfdisk", "-V", new)
    verify_disk(new, disk, tmp_path)  # sfdisk, sgdisk -v, fsck, every file's SHA-256
    assert os.path.getsize(new) == SIZE
    assert sha256_range(new, TAIL, tail_size) == sha256_range("/dev/zero", 0, tail_size)
    assert allocated(new) < SIZE - 20 * MiB  # the tail is a hole
    assert sha256_range(new, 0, MiB) == sha256_range(disk.path, 0, MiB)  # MBR, GPT, gap
    assert_only_zeroed(disk.path, new, 0, SIZE)
    # each partition of the restored disk is its item, byte for byte
    for n, p in disk.parts.items():
        got = dv("extract", "--stdout", f"{plain}::a", f"disk/part{n}").stdout
        assert len(got) == p.size
        with open(new, "rb") as f:
            f.seek(p.start)
            assert f.read(p.size) == got, n
    # onto a device full of other data: the tail is zeroed, the disk valid
    target = str(tmp_path / "target.img")
    random_fill(target, SIZE, 19)
    with loop_device(target) as dev:
        dv("disk", "restore", f"{plain}::a", dev)
    verify_disk(target, disk, tmp_path)
    assert sha256_range(target, TAIL, tail_size) == sha256_range("/dev/zero", 0, tail_size)

    # --keep-unpartitioned: the tail comes back byte for byte
    kept = str(tmp_path / "kept.img")
    dv("disk", "restore", f"{keep}::b", kept)
    verify_disk(kept, disk, tmp_path)
    assert sha256_range(kept, TAIL, tail_size) == sha256_range(disk.path, TAIL, tail_size)
    assert_only_zeroed(disk.path, kept, 0, SIZE)
