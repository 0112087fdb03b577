"""btrfs block map, proven as BLOCKMAPS.md says: mkfs.btrfs over non-zero bytes, filled
through a loop mount, some files deleted; compared with btrfs's own dump of the extent
and chunk trees, restored used-only, checked by btrfs check, every file's hash, and a
scrub (which reads both DUP copies: btrfs check alone misses a lost second copy)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
from blockmap.ntfs_fat_xfs_helpers import (
    MemReader,
    build_map,
    delete_some,
    mounted,
    prefill,
    remove_images,
    stale_fraction,
    tree_hashes,
    used_blocks,
    write_files,
)
from blockmap.verify import restore_used_only
from support import loop_device, needs_loop, needs_tool

from diskvault.blockmap import btrfs
from diskvault.errors import BlockMapError
from diskvault.source.reader import FileRangeReader

SIZE = 300 << 20

pytestmark = [needs_loop, needs_tool("mkfs.btrfs", "btrfs")]


@pytest.fixture(autouse=True)
def _drop_images(tmp_path):
    yield
    remove_images(str(tmp_path))


def _mkfs(path: str, *opts: str, seed: int = 0) -> None:
    prefill(path, SIZE, seed)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-K", *opts, path], check=True,
                   capture_output=True)


@pytest.fixture(scope="module", params=[[], ["-d", "dup"], ["-M"]],
                ids=["default", "data-dup", "mixed-groups"])
def image(request, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    d = tmp_path_factory.mktemp("btrfs")
    path = str(d / "btrfs.img")
    _mkfs(path, *request.param, seed=len(request.param))
    with loop_device(path) as dev, mounted(dev, str(d / "mnt")) as mnt:
        files = write_files(mnt, 11, 36, 2_000_000)
        os.sync()  # allocate before deleting, so the deleted data really was on disk
        delete_some(mnt, files)
    yield path, files
    remove_images(str(d))


def _dump(path: str, tree: str) -> str:
    return subprocess.run(["btrfs", "inspect-internal", "dump-tree", "-t", tree, path],
                          check=True, capture_output=True, text=True).stdout


def _reference_used(path: str, block: int, node: int) -> np.ndarray:
    """Physical blocks of every extent btrfs's dump-tree lists, at every chunk stripe."""
    chunks: list[tuple[int, int, list[int]]] = []
    for line in _dump(path, "chunk").splitlines():
        if m := re.search(r"CHUNK_ITEM (\d+)\)", line):
            chunks.append((int(m.group(1)), 0, []))
        elif chunks and (m := re.match(r"\s+length (\d+) ", line)):
            chunks[-1] = (chunks[-1][0], int(m.group(1)), chunks[-1][2])
        elif chunks and (m := re.search(r"stripe \d+ devid \d+ offset (\d+)", line)):
            chunks[-1][2].append(int(m.group(1)))
    assert chunks and all(length and offs for _s, length, offs in chunks)
    used = np.zeros(os.path.getsize(path) // block, dtype=bool)

    def mark(logical: int, length: int) -> None:
        for start, clen, offs in chunks:
            if start <= logical < start + clen:
                for off in offs:
                    p = off + logical - start
                    used[p // block : (p + length + block - 1) // block] = True
                return
        raise AssertionError(f"extent {logical} in no chunk")

    ext = _dump(path, "extent")
    for start, length in re.findall(r"key \((\d+) EXTENT_ITEM (\d+)\)", ext):
        mark(int(start), int(length))
    for start in re.findall(r"key \((\d+) METADATA_ITEM \d+\)", ext):
        mark(int(start), node)
    used[: (1 << 20) // block] = True  # boot area and primary superblock
    used[(64 << 20) // block] = True  # the superblock mirror inside 300 MiB
    return used


def test_detect(image) -> None:
    r = FileRangeReader.open(image[0])
    try:
        assert btrfs.detect(r)
    finally:
        r.close()


def test_map_matches_dump_tree(image) -> None:
    path = image[0]
    bmap = build_map(btrfs, path)
    with open(path, "rb") as f:
        f.seek(0x10000)
        sb = btrfs.parse_super(f.read(4096), SIZE)
    ours = used_blocks(bmap, bmap.block_size)
    ref = _reference_used(path, bmap.block_size, sb.node)
    assert np.array_equal(ours, ref), np.flatnonzero(ours != ref)[:20]


def test_restore_used_only_is_identical(image, tmp_path) -> None:
    path, files = image
    bmap = build_map(btrfs, path)
    assert stale_fraction(path, bmap) > 0.97
    restored = str(tmp_path / "restored.img")
    assert restore_used_only(path, bmap, restored) == bmap.used_bytes()
    chk = subprocess.run(["btrfs", "check", "--readonly", restored], capture_output=True,
                         text=True)
    assert chk.returncode == 0, chk.stderr
    with loop_device(restored, read_only=True) as dev, \
            mounted(dev, str(tmp_path / "mnt"), "-o", "ro") as mnt:
        assert tree_hashes(mnt) == files
        scrub = subprocess.run(["btrfs", "scrub", "start", "-B", "-r", mnt],
                               capture_output=True, text=True)
        assert "no errors found" in scrub.stdout, scrub.stdout + scrub.stderr


def test_log_tree_refused(tmp_path) -> None:
    """A copy taken after an fsync but before the commit has a log root: refused."""
    path = str(tmp_path / "log.img")
    _mkfs(path, seed=5)
    with loop_device(path) as dev, \
            mounted(dev, str(tmp_path / "mnt"), "-o", "commit=300") as mnt:
        with open(os.path.join(mnt, "a"), "wb") as f:
            f.write(os.urandom(1 << 20))
        os.sync()  # a commit; then fsync'd changes that only the log tree holds (the
        # first fsync after a commit may still commit in full, the next one logs)
        for name in ("a", "b"):
            with open(os.path.join(mnt, name), "ab") as f:
                f.write(os.urandom(1 << 16))
                f.flush()
                os.fsync(f.fileno())
        snap = str(tmp_path / "snap.img")
        shutil.copyfile(path, snap)
    super_dump = subprocess.run(["btrfs", "inspect-internal", "dump-super", snap],
                                capture_output=True, text=True).stdout
    assert re.search(r"^log_root\s+[1-9]", super_dump, re.M), super_dump
    with pytest.raises(BlockMapError, match="log tree"):
        build_map(btrfs, snap)
    build_map(btrfs, path)  # unmounted: committed, no log


def test_live_snapshot_without_log(tmp_path) -> None:
    """A copy of a mounted filesystem (no fsync, so no log tree) holds the last commit:
    its used-only restore shows exactly what the full copy shows, and passes scrub."""
    path = str(tmp_path / "live.img")
    _mkfs(path, seed=6)
    with loop_device(path) as dev, \
            mounted(dev, str(tmp_path / "mnt"), "-o", "commit=300") as mnt:
        committed = write_files(os.path.join(mnt, "old"), 6, 12, 800_000)
        os.sync()
        write_files(os.path.join(mnt, "new"), 7, 12, 800_000)  # not committed yet
        delete_some(os.path.join(mnt, "old"), committed)
        snap = str(tmp_path / "snap.img")
        shutil.copyfile(path, snap)
    bmap = build_map(btrfs, snap)
    restored = str(tmp_path / "restored.img")
    restore_used_only(snap, bmap, restored)
    views = []
    for img in (snap, restored):
        with loop_device(img, read_only=True) as dev, \
                mounted(dev, str(tmp_path / "view"), "-o", "ro") as mnt:
            views.append(tree_hashes(mnt))
            scrub = subprocess.run(["btrfs", "scrub", "start", "-B", "-r", mnt],
                                   capture_output=True, text=True)
            assert "no errors found" in scrub.stdout, scrub.stdout + scrub.stderr
    assert views[0] == views[1]
    assert any(k.startswith("old") for k in views[0])


def test_multi_device_refused(tmp_path) -> None:
    paths = [str(tmp_path / f"dev{i}.img") for i in range(2)]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(SIZE)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-K", "-d", "raid1", "-m", "raid1", *paths],
                   check=True, capture_output=True)
    with pytest.raises(BlockMapError, match="devices"):
        build_map(btrfs, paths[0])


def test_raid_profile_chunk_refused(image) -> None:
    fs = btrfs.Filesystem(FileRangeReader.open(image[0]))
    chunk = struct.pack("<QQQQIIIHH", 1 << 20, 2, 65536, 1 | (1 << 4), 4096, 4096, 4096, 2, 1)
    chunk += struct.pack("<QQ16s", fs.sb.devid, 1 << 22, bytes(16)) * 2
    with pytest.raises(BlockMapError, match="profile"):
        fs._parse_chunk(0, chunk)
    fs.r.close()


def test_inconsistent_metadata_refused(image, tmp_path) -> None:
    path = str(tmp_path / "bad.img")
    shutil.copyfile(image[0], path)
    with open(path, "r+b") as f:
        f.seek(0x10000 + 0x78)
        used = struct.unpack("<Q", f.read(8))[0]
        f.seek(0x10000 + 0x78)
        f.write(struct.pack("<Q", used + 4096))
    with pytest.raises(BlockMapError, match="add up"):
        build_map(btrfs, path)

    shutil.copyfile(image[0], path)
    fs = btrfs.Filesystem(FileRangeReader.open(path))
    root_phys = fs.physical(fs.sb.root, fs.sb.node)[0]
    fs.r.close()
    with open(path, "r+b") as f:  # the root tree's block claims another address
        f.seek(root_phys + 0x30)
        f.write(struct.pack("<Q", 4096))
    with pytest.raises(BlockMapError, match="stale or damaged"):
        build_map(btrfs, path)

    with pytest.raises(BlockMapError, match="exceeds"):
        build_map(btrfs, image[0], SIZE - (1 << 20))


def test_garbage_superblock_refused() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        buf = bytearray(rng.bytes(1 << 20))
        buf[0x10040:0x10048] = btrfs.MAGIC
        with pytest.raises(BlockMapError):
            btrfs.build(MemReader(buf))
    with pytest.raises(BlockMapError):
        btrfs.build(MemReader(bytes(0x10000) + btrfs.MAGIC))
