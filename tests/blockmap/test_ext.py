"""ext2/3/4 block maps, proved as BLOCKMAPS.md asks: real mke2fs images over random bytes,
the map equal to dumpe2fs's allocation, and a used-only restore that is fsck-clean with
every file's SHA-256 unchanged."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from blockmap.ext_helpers import (
    dumpe2fs_metadata,
    dumpe2fs_used,
    e2fsck_clean,
    fs_files,
    map_used_per_block,
    mkfs,
    mounted_rw,
    populate,
    random_file,
    run,
    tree_sums,
)
from blockmap.verify import restore_used_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import have_root, needs_tool

from diskvault.blockmap import ext, ext_journal, ext_layout, probe
from diskvault.blockmap.base import BlockMap
from diskvault.errors import BlockMapError
from diskvault.source.reader import FileRangeReader

pytestmark = needs_tool("mke2fs", "dumpe2fs", "debugfs", "e2fsck")
MiB = 1 << 20
KERNEL = have_root() and shutil.which("losetup") is not None


def build_map(image: Path, offset: int = 0, size: int | None = None) -> BlockMap:
    r = FileRangeReader.open(str(image), offset, size)
    try:
        return ext.build(r)
    finally:
        r.close()


def delete_and_add(image: Path, tmp: Path, rng: random.Random) -> None:
    """Free some blocks and allocate others, so the map sees real allocator work:
    via the kernel when root (loop mount), else with debugfs."""
    names = run("debugfs", "-R", "ls -p /d0/e0", str(image))
    victims = [n.split("/")[5] for n in names.splitlines() if n.endswith("/") and ".bin" in n]
    if KERNEL:
        with mounted_rw(image, tmp / "rw") as mnt:
            for name in victims[::2]:
                (mnt / "d0" / "e0" / name).unlink()
            new = mnt / "new"
            new.mkdir()
            for i in range(6):  # lands in freed space and in never-used groups
                (new / f"n{i}").write_bytes(rng.randbytes(rng.randrange(1, 3 * MiB // 2)))
    else:  # one debugfs run: with MMP every read-write open waits out the interval
        script = tmp / "rm-script"
        script.write_text("".join(f"rm /d0/e0/{name}\n" for name in victims[::2]))
        run("debugfs", "-w", "-f", str(script), str(image))


def assert_map_proved(image: Path, tmp: Path, bmap: BlockMap) -> None:
    """The proof: map == dumpe2fs allocation; used-only restore is clean and identical."""
    bs, nblocks, ref = dumpe2fs_used(image)
    mine = map_used_per_block(bmap, bs, nblocks)
    lost = np.flatnonzero(ref & ~mine)
    assert not len(lost), f"blocks dumpe2fs calls used but the map frees: {lost[:20]}"
    extra = np.flatnonzero(mine & ~ref)
    # the only deliberate extra: the boot area (first 2 KiB), already used on 4 KiB blocks
    assert set(extra.tolist()) <= set(range(2048 // bs)), f"over-marked blocks: {extra[:20]}"
    assert bmap.used_bytes() < 0.7 * bmap.size, "map should leave real free space out"

    restored = tmp / "restored.img"
    restore_used_only(str(image), bmap, str(restored))
    # the skipped blocks held stale random data: zeros there prove they were not needed
    with open(image, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8).reshape(-1, bs)
    skipped = raw[~mine]
    assert len(skipped) and (skipped.any(axis=1).mean() > 0.95)
    e2fsck_clean(restored)
    want = fs_files(image, tmp / "orig")
    assert want, "the filesystem should hold files"
    assert fs_files(restored, tmp / "rest") == want


VARIANTS = {
    "ext2": (32, ["-t", "ext2", "-b", "4096", "-g", "2048"]),
    "ext3-1k": (32, ["-t", "ext3", "-b", "1024"]),
    "ext4": (64, ["-t", "ext4", "-b", "4096", "-g", "2048"]),
    "ext4-no-flex_bg": (64, ["-t", "ext4", "-b", "4096", "-g", "2048", "-O", "^flex_bg"]),
    "ext4-1k": (32, ["-t", "ext4", "-b", "1024"]),
    "ext4-meta_bg": (64, ["-t", "ext4", "-b", "1024", "-g", "1024", "-O",
                          "meta_bg,^resize_inode"]),
    "ext4-meta_bg-32bit": (48, ["-t", "ext4", "-b", "1024", "-g", "512", "-O",
                                "meta_bg,^resize_inode,^64bit"]),
    "ext4-bigalloc": (64, ["-t", "ext4", "-b", "4096", "-g", "1024", "-O", "bigalloc",
                           "-C", "16384"]),
    "ext4-bigalloc-1k": (32, ["-t", "ext4", "-b", "1024", "-O", "bigalloc", "-C", "16384"]),
    "ext4-sparse_super2": (64, ["-t", "ext4", "-b", "4096", "-g", "2048", "-O",
                                "sparse_super2"]),
    "ext4-uninit_bg": (64, ["-t", "ext4", "-b", "4096", "-g", "2048", "-O",
                            "^metadata_csum,uninit_bg"]),
    "ext4-mmp": (32, ["-t", "ext4", "-b", "4096", "-g", "2048"]),  # + tune2fs -O mmp
    "ext4-no-sparse_super": (32, ["-t", "ext4", "-b", "4096", "-g", "1024", "-O",
                                  "^sparse_super,^resize_inode"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_map_equals_dumpe2fs_and_restores(variant: str, tmp_path: Path) -> None:
    size, args = VARIANTS[variant]
    rng = random.Random(variant)
    src = tmp_path / "src"
    populate(src, rng, nfiles=30, max_size=MiB)
    image = tmp_path / "fs.img"
    mkfs(image, size * MiB, *args, "-d", str(src))
    delete_and_add(image, tmp_path, rng)
    if variant == "ext4-mmp":  # enabled afterwards: debugfs -w waits ~11 s on an MMP fs
        run("tune2fs", "-O", "mmp", str(image))
        assert "MMP block number" in run("dumpe2fs", "-h", str(image))
    bmap = build_map(image)
    assert bmap.note == ""
    assert bmap.fs_type == ("ext2" if variant == "ext2" else "ext3" if "ext3" in variant
                            else "ext4")
    if "bigalloc" in variant:
        assert bmap.block_size == 16384
    assert layout_blocks(image) == dumpe2fs_metadata(image)
    assert_map_proved(image, tmp_path, bmap)


def layout_blocks(image: Path) -> set[int]:
    """The static metadata the parser computes, as a set of block numbers."""
    r = FileRangeReader.open(str(image))
    try:
        sb = ext_layout.parse_super(r.pread(1024, 1024), r.size)
        starts, counts = ext_layout.metadata_runs(sb, ext_layout.read_descriptors(r, sb))
    finally:
        r.close()
    return {b for s, c in zip(starts.tolist(), counts.tolist(), strict=True)
            for b in range(s, s + c)}


def test_block_uninit_flag_ignored_without_checksums(tmp_path: Path) -> None:
    """ext2 has no descriptor checksums: a BLOCK_UNINIT flag there proves nothing, so the
    bitmap is read (as the kernel and e2fsprogs do) and the data in that group is kept."""
    src = tmp_path / "src"
    populate(src, random.Random(5), 30, MiB)
    image = tmp_path / "fs.img"
    mkfs(image, 32 * MiB, "-t", "ext2", "-b", "4096", "-g", "1024", "-d", str(src))
    _, _, used = dumpe2fs_used(image)
    group = next(g for g in range(1, 8) if used[g * 1024 + 64 : (g + 1) * 1024].any())
    run("debugfs", "-w", "-R", f"set_bg {group} flags 2", str(image))
    with open(image, "rb") as f:  # ext2, 4 KiB blocks: 32-byte descriptors from block 1
        f.seek(4096 + 32 * group + 0x12)
        assert struct.unpack("<H", f.read(2))[0] == 2
    assert_map_proved(image, tmp_path, build_map(image))


def test_mmp_block_always_kept(tmp_path: Path) -> None:
    """Static metadata is marked whatever the bitmap says (here: the MMP block freed)."""
    image = tmp_path / "fs.img"
    # no checksums, so the bytes can be patched directly (debugfs -w waits out MMP)
    mkfs(image, 16 * MiB, "-t", "ext4", "-b", "4096", "-O", "mmp,^metadata_csum,^64bit")
    text = run("dumpe2fs", str(image))
    mmp = int(text.split("MMP block number:")[1].split()[0])
    bitmap = int(text.split("Block bitmap at ")[1].split()[0])
    assert mmp < 32768, "MMP block should sit in group 0"
    with open(image, "r+b") as f:
        f.seek(bitmap * 4096 + mmp // 8)
        byte = f.read(1)[0]
        assert byte & (1 << (mmp % 8))
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte & ~(1 << (mmp % 8))]))
        for off, fmt in ((4096 + 0xC, "<H"), (1024 + 0xC, "<I")):  # group 0 and sb free
            f.seek(off)
            (n,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
            f.seek(off)
            f.write(struct.pack(fmt, n + 1))
    _, _, used = dumpe2fs_used(image)
    assert not used[mmp]
    bmap = build_map(image)  # the counts agree, so the map is built, not refused
    assert bmap.used_ranges(mmp * 4096, (mmp + 1) * 4096) == [(mmp * 4096, 4096)]


def test_partition_inside_disk_image(tmp_path: Path) -> None:
    """A filesystem at an offset inside a bigger device, with slack after its end."""
    part = tmp_path / "part.img"
    src = tmp_path / "src"
    populate(src, random.Random(7), 12, MiB)
    mkfs(part, 24 * MiB, "-t", "ext4", "-b", "4096", "-d", str(src))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.write(b"\x5a" * MiB)
        f.write(part.read_bytes())
        f.write(b"\xa5" * (3 * MiB + 512))  # partition larger than the fs, odd tail
    bmap = build_map(disk, MiB, 27 * MiB + 512)
    direct = build_map(part)
    fs_blocks = direct.nblocks
    assert 0 < direct.used_bytes() < direct.size
    assert np.array_equal(bmap.bits[: fs_blocks // 8], direct.bits[: fs_blocks // 8])
    # past the filesystem nothing is proven free
    assert bmap.used_ranges(24 * MiB, 27 * MiB + 512) == [(24 * MiB, 3 * MiB + 512)]


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 600_000), min_size=1, max_size=25),
    delete=st.lists(st.booleans(), min_size=25, max_size=25),
    block=st.sampled_from(["1024", "4096"]),
)
def test_random_contents(tmp_path: Path, sizes: list[int], delete: list[bool], block: str) -> None:
    """Property: for any file set, the map equals dumpe2fs and the restore is identical."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # one fresh dir per example
    src = work / "src"
    src.mkdir()
    for i, size in enumerate(sizes):
        (src / f"f{i}").write_bytes(random.randbytes(size))
    image = work / "fs.img"
    mkfs(image, 16 * MiB, "-t", "ext4", "-b", block, "-g", "1024", "-d", str(src))
    for i in range(len(sizes)):
        if delete[i]:
            run("debugfs", "-w", "-R", f"rm /f{i}", str(image))
    bmap = build_map(image)
    bs, nblocks, ref = dumpe2fs_used(image)
    mine = map_used_per_block(bmap, bs, nblocks)
    assert not (ref & ~mine).any()
    assert set(np.flatnonzero(mine & ~ref).tolist()) <= set(range(2048 // bs))
    restored = work / "r.img"
    restore_used_only(str(image), bmap, str(restored))
    e2fsck_clean(restored)
    want = fs_files(image, work / "o")
    assert fs_files(restored, work / "r") == want
    assert len(want) == sum(not d for d in delete[: len(sizes)])


# --- journals that were not replayed --------------------------------------------


def _assert_replayed_restore(dirty: Path, tmp: Path, want: dict[str, str]) -> BlockMap:
    bmap = build_map(dirty)
    assert "journal not replayed" in bmap.note
    restored = tmp / "restored.img"
    restore_used_only(str(dirty), bmap, str(restored))
    r = subprocess.run(["e2fsck", "-fy", str(restored)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: journal replayed
    e2fsck_clean(restored)
    assert fs_files(restored, tmp / "rest") == want
    return bmap


def _stale_on_disk(dirty: Path, replayed_used: np.ndarray, bs: int) -> int:
    """How many blocks replay calls used that the on-disk bitmaps alone leave free
    (the map built with the journal step switched off)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ext, "_or_in_journal", lambda *_: "journal ignored")
        on_disk = build_map(dirty)
    mine = map_used_per_block(on_disk, bs, len(replayed_used))
    return int((replayed_used & ~mine).sum())


KERNEL_JOURNALS = {
    "ext4": ["-t", "ext4", "-b", "4096", "-g", "4096"],  # 64-bit csum v3 tags
    "ext4-32bit": ["-t", "ext4", "-b", "4096", "-g", "4096", "-O", "^64bit"],
    "ext4-nocsum": ["-t", "ext4", "-b", "1024", "-O", "^metadata_csum"],  # 12-byte tags
    "ext3": ["-t", "ext3", "-b", "1024"],  # 8-byte tags, indirect-mapped journal
}


@pytest.mark.skipif(not KERNEL, reason="needs root and loop devices to mount ext4")
@pytest.mark.parametrize("variant", sorted(KERNEL_JOURNALS))
def test_crash_consistent_copy_of_mounted_fs(variant: str, tmp_path: Path) -> None:
    """Copy the image while mounted, after fsync: data and journal are on disk, the
    bitmaps only in the journal. The restore + journal replay must lose no file."""
    image, dirty = tmp_path / "live.img", tmp_path / "dirty.img"
    mkfs(image, 48 * MiB, *KERNEL_JOURNALS[variant])
    rng = random.Random(variant)
    with mounted_rw(image, tmp_path / "mnt") as mnt:
        old = [mnt / f"old{i}" for i in range(8)]
        for p in old:
            _write_synced(p, rng.randbytes(rng.randrange(1, 1 * MiB)))
        subprocess.run(["sync", "-f", str(mnt)], check=True)  # these reach home locations
        for i in range(40):
            _write_synced(mnt / f"f{i}", rng.randbytes(rng.randrange(1, 700_000)))
        for p in old[::2]:  # frees blocks only in the journal's bitmap copies
            p.unlink()
        _write_synced(mnt / "last", b"x" * 5000)
        shutil.copyfile(image, dirty)  # crash-consistent: fsynced state, not checkpointed
        want = tree_sums(mnt)
    assert "needs_recovery" in run("dumpe2fs", "-h", str(dirty))
    replayed = tmp_path / "replayed.img"
    shutil.copyfile(dirty, replayed)
    subprocess.run(["e2fsck", "-fy", str(replayed)], capture_output=True)
    bs, _, replayed_used = dumpe2fs_used(replayed)
    # the premise: without the journal's bitmap copies the map would lose data
    assert _stale_on_disk(dirty, replayed_used, bs) > 100
    bmap = _assert_replayed_restore(dirty, tmp_path, want)
    mine = map_used_per_block(bmap, bs, len(replayed_used))
    assert not (replayed_used & ~mine).any()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # commit the directory entry too
    finally:
        os.close(fd)


@pytest.mark.parametrize("args", [["-t", "ext4", "-b", "4096", "-g", "2048"],
                                  ["-t", "ext3", "-b", "1024"]], ids=["ext4", "ext3"])
def test_journal_written_by_debugfs(args: list[str], tmp_path: Path) -> None:
    """Deterministic dirty journal (no root): state B's metadata only in A's journal,
    B's file data at home, plus a revoke and an uncommitted transaction."""
    src = tmp_path / "src"
    populate(src, random.Random(3), 10, 400_000)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    mkfs(a, 32 * MiB, *args, "-d", str(src))
    shutil.copyfile(a, b)
    payload = tmp_path / "payload"
    for i in range(5):
        payload.write_bytes(random.randbytes(300_000 + i * 1000))
        run("debugfs", "-w", "-R", f"write {payload} /added{i}", str(b))
    run("debugfs", "-w", "-R", "rm /d0/e0/f0.bin", str(b))
    bs, nblocks, b_used = dumpe2fs_used(b)
    data = set()
    for i in range(5):
        out = run("debugfs", "-R", f"blocks /added{i}", str(b))
        data |= {int(x) for x in out.split()}
    raw_a = np.fromfile(a, dtype=np.uint8).reshape(-1, bs)
    raw_b = np.fromfile(b, dtype=np.uint8).reshape(-1, bs)
    changed = np.flatnonzero((raw_a != raw_b).any(axis=1))
    meta = [int(x) for x in changed if int(x) not in data]
    for x in data:  # data=ordered: file data reaches its home before the commit
        raw_a[x] = raw_b[x]
    raw_a.tofile(a)
    half = len(meta) // 2
    script = ["jo"]
    for i, part in enumerate((meta[:half], meta[half:])):
        contents = tmp_path / f"t{i}"
        contents.write_bytes(b"".join(raw_b[x].tobytes() for x in part))
        script.append(f"jw -b {','.join(map(str, part))} {contents}")
    # a transaction revoking an unrelated block, never committed, whose "bitmap" copy
    # is all ones: replay ignores it, the map may only over-mark because of it
    bb = _bitmap_blocks(a)
    ones = tmp_path / "ones"
    ones.write_bytes(b"\xff" * bs)
    script.append(f"jw -r {max(data) + 1} -b {bb[-1]} -c {ones}")
    script.append("jc")
    (tmp_path / "script").write_text("\n".join(script) + "\n")
    run("debugfs", "-w", "-f", str(tmp_path / "script"), str(a))
    assert "needs_recovery" in run("dumpe2fs", "-h", str(a))
    want = fs_files(b, tmp_path / "want")
    assert _stale_on_disk(a, b_used, bs) >= len(data) > 0
    bmap = _assert_replayed_restore(a, tmp_path, want)
    assert "copies from 2 logged transactions" in bmap.note
    assert not (b_used & ~map_used_per_block(bmap, bs, nblocks)).any()


def _bitmap_blocks(image: Path) -> list[int]:
    r = FileRangeReader.open(str(image))
    try:
        sb = ext_layout.parse_super(r.pread(1024, 1024), r.size)
        return ext_layout.read_descriptors(r, sb)["block_bitmap"].tolist()
    finally:
        r.close()


def test_needs_recovery_with_an_empty_journal(tmp_path: Path) -> None:
    """The flag alone (log start 0, nothing to replay): on-disk bitmaps, said so."""
    src = tmp_path / "src"
    populate(src, random.Random(9), 10, MiB)
    image = tmp_path / "fs.img"
    mkfs(image, 32 * MiB, "-t", "ext4", "-b", "4096", "-g", "2048", "-d", str(src))
    run("debugfs", "-w", "-R", "feature needs_recovery", str(image))
    bmap = build_map(image)
    assert "journal is empty" in bmap.note
    bs, nblocks, ref = dumpe2fs_used(image)
    assert np.array_equal(map_used_per_block(bmap, bs, nblocks), ref)


def test_journal_that_resizes_is_refused(tmp_path: Path) -> None:
    """A logged superblock with another geometry (online resize): all used."""
    image = tmp_path / "fs.img"
    random_file(image, 48 * MiB)
    run("mke2fs", "-q", "-F", "-E", "nodiscard", "-t", "ext4", "-b", "4096", "-g", "2048",
        str(image), "8192")  # a 32 MiB fs on a 48 MiB device: room to grow
    block0 = bytearray(image.read_bytes()[:4096])
    (ipg,) = struct.unpack_from("<I", block0, 1024 + 0x28)
    struct.pack_into("<II", block0, 1024, 5 * ipg, 9216)  # inodes, blocks: 5 groups
    (tmp_path / "sb").write_bytes(bytes(block0))
    _journal_write(image, tmp_path, [0], tmp_path / "sb")
    _refused(image, "resizes")


def test_fast_commit_journal_needing_recovery_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 32 * MiB, "-t", "ext4", "-b", "4096", "-O", "fast_commit")
    bb = _bitmap_blocks(image)[0]
    (tmp_path / "bitmap").write_bytes(image.read_bytes()[bb * 4096 : (bb + 1) * 4096])
    _journal_write(image, tmp_path, [bb], tmp_path / "bitmap")
    _refused(image, "fast commits")


def _journal_write(image: Path, tmp: Path, blocks: list[int], contents: Path) -> None:
    """One committed jbd2 transaction logging ``blocks`` (needs_recovery gets set)."""
    script = tmp / "jscript"
    script.write_text(f"jo\njw -b {','.join(map(str, blocks))} {contents}\njc\n")
    run("debugfs", "-w", "-f", str(script), str(image))
    assert "needs_recovery" in run("dumpe2fs", "-h", str(image))


def test_damaged_journal_superblock_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 32 * MiB, "-t", "ext4", "-b", "4096", "-g", "2048")
    bb = _bitmap_blocks(image)[0]
    (tmp_path / "bitmap").write_bytes(image.read_bytes()[bb * 4096 : (bb + 1) * 4096])
    _journal_write(image, tmp_path, [bb], tmp_path / "bitmap")
    jsb = int(run("debugfs", "-R", "bmap <8> 0", str(image)).split()[0])
    with open(image, "r+b") as f:
        f.seek(jsb * 4096)
        f.write(b"\0\0\0\0")  # the jbd2 magic
    _refused(image, "journal superblock is damaged")


def test_external_journal_needing_recovery_falls_back(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MiB, "-t", "ext4", "-b", "4096")
    run("debugfs", "-w", "-R", "feature needs_recovery", str(image))
    _set_super(image, 0xE0, "<I", 0)  # journal inode gone, journal on device 8:1
    _set_super(image, 0xE4, "<I", 0x801)
    with pytest.raises(BlockMapError, match="another device"):
        build_map(image)


def test_journal_device_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "jdev.img"
    mkfs(image, 16 * MiB, "-O", "journal_dev", "-b", "4096")
    r = FileRangeReader.open(str(image))
    try:
        assert ext.fs_type(r) == "jbd"
        with pytest.raises(BlockMapError, match="journal device"):
            ext.build(r)
        assert probe.block_map_for(r).is_all_used
    finally:
        r.close()


# --- bad input ------------------------------------------------------------------


def _set_super(image: Path, offset: int, fmt: str, value: int) -> None:
    """Patch a primary-superblock field (checksum left stale: the parser ignores it)."""
    with open(image, "r+b") as f:
        f.seek(1024 + offset)
        f.write(struct.pack(fmt, value))


@pytest.fixture
def clean_image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    populate(src, random.Random(11), 12, 1 * MiB)
    image = tmp_path / "fs.img"
    mkfs(image, 32 * MiB, "-t", "ext4", "-b", "4096", "-g", "2048", "-d", str(src))
    return image


def _refused(image: Path, match: str, size: int | None = None) -> None:
    with pytest.raises(BlockMapError, match=match):
        build_map(image, 0, size)
    r = FileRangeReader.open(str(image), 0, size)
    try:
        fallback = probe.block_map_for(r)
    finally:
        r.close()
    assert fallback.is_all_used and fallback.note


def test_garbage_superblock(tmp_path: Path) -> None:
    image = tmp_path / "junk.img"
    image.write_bytes(random.Random(1).randbytes(4 * MiB))
    _set_super(image, 0x38, "<H", 0xEF53)  # right magic, nonsense elsewhere
    _refused(image, "ext")


def test_truncated_image(clean_image: Path) -> None:
    _refused(clean_image, "larger than its device", size=20 * MiB)


def test_superblock_free_count_disagrees(clean_image: Path) -> None:
    run("debugfs", "-w", "-R", "ssv free_blocks_count 1234", str(clean_image))
    _refused(clean_image, "superblock says 1234")


def test_group_free_count_disagrees(clean_image: Path) -> None:
    run("debugfs", "-w", "-R", "set_bg 0 free_blocks_count 3", str(clean_image))
    _refused(clean_image, "group 0")


def test_block_uninit_flag_on_a_used_group(clean_image: Path) -> None:
    """A forged BLOCK_UNINIT on a group holding data must not free that data."""
    _, _, used = dumpe2fs_used(clean_image)
    groups = [g for g in range(1, 8) if used[g * 2048 + 200 : (g + 1) * 2048].any()]
    assert groups, "test image should have data past group 0"
    run("debugfs", "-w", "-R", f"set_bg {groups[0]} flags 2", str(clean_image))
    _refused(clean_image, "BLOCK_UNINIT")


def test_descriptor_outside_filesystem(clean_image: Path) -> None:
    run("debugfs", "-w", "-R", "set_bg 1 block_bitmap 99999999", str(clean_image))
    _refused(clean_image, "outside the filesystem")


def test_overlapping_metadata(clean_image: Path) -> None:
    itable = run("dumpe2fs", str(clean_image)).split("Inode table at ")[1].split("-")[0]
    run("debugfs", "-w", "-R", f"set_bg 1 block_bitmap {int(itable) + 1}", str(clean_image))
    _refused(clean_image, "overlap")


@pytest.mark.parametrize("state,match", [(0, "not cleanly unmounted"), (3, "errors")])
def test_unclean_state_without_journal(tmp_path: Path, state: int, match: str) -> None:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MiB, "-t", "ext2", "-b", "4096")
    _set_super(image, 0x3A, "<H", state)
    _refused(image, match)


def test_unknown_incompat_feature(clean_image: Path) -> None:
    with open(clean_image, "rb") as f:
        f.seek(1024 + 0x60)
        (incompat,) = struct.unpack("<I", f.read(4))
    _set_super(clean_image, 0x60, "<I", incompat | 0x80000000)
    _refused(clean_image, "features")


# --- pure functions, against naive models ----------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=30),
       st.lists(st.tuples(st.integers(0, 340), st.integers(0, 60)), min_size=1, max_size=10))
def test_merge_and_count_match_a_bool_model(
    runs: list[tuple[int, int]], windows: list[tuple[int, int]]
) -> None:
    model = np.zeros(400, dtype=bool)
    for s, c in runs:
        model[s : s + c] = True
    s = np.array([r[0] for r in runs], dtype=np.int64)
    c = np.array([r[1] for r in runs], dtype=np.int64)
    ms, mc = ext_layout.merge_runs(s[c > 0], c[c > 0])
    merged = np.zeros(400, dtype=bool)
    for a, n in zip(ms.tolist(), mc.tolist(), strict=True):
        assert not merged[a : a + n].any(), "merged runs must not overlap"
        merged[a : a + n] = True
    assert np.array_equal(merged, model)
    assert (ms[1:] > ms[:-1] + mc[:-1]).all(), "touching runs must be joined"
    lo = np.array([w[0] for w in windows], dtype=np.int64)
    hi = lo + np.array([w[1] for w in windows], dtype=np.int64)
    got = ext_layout.count_in(ms, mc, lo, hi)
    assert got.tolist() == [int(model[a:b].sum()) for a, b in zip(lo, hi, strict=True)]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(1, 9))
def test_in_place_bit_shift_matches_a_model(data: bytes, step: int) -> None:
    """1 KiB blocks: the rows move up one bit in place, chunk by chunk, nothing lost."""
    buf = np.frombuffer(data + b"\0", dtype=np.uint8).copy()
    bits = np.unpackbits(buf[:-1], bitorder="little")
    want = np.packbits(np.concatenate(([0], bits)), bitorder="little")
    ext._shift_up_one_bit(buf, len(data), step)
    assert np.array_equal(buf[: len(want)], want)


@settings(max_examples=200, deadline=None)
@given(
    tags=st.lists(st.tuples(st.integers(1, (1 << 40) - 1), st.booleans(), st.booleans()),
                  min_size=1, max_size=20),
    incompat=st.sampled_from([0, 0x2, 0x8, 0xA, 0x10, 0x12]),
)
def test_jbd2_descriptor_tags_round_trip(
    tags: list[tuple[int, bool, bool]], incompat: int
) -> None:
    """Tags in every layout (32/64-bit, csum v2/v3, with or without UUID) parse back."""
    is64, v3, v2 = incompat & 0x2, incompat & 0x10, incompat & 0x8
    block = bytearray(struct.pack(">III", ext_journal.JBD2_MAGIC, 1, 7))
    expect = []
    for i, (target, same_uuid, escape) in enumerate(tags):
        target = target if is64 else target & 0xFFFFFFFF
        flags = (2 if same_uuid else 0) | (1 if escape else 0) | (8 if i == len(tags) - 1 else 0)
        if v3:
            block += struct.pack(">IIII", target & 0xFFFFFFFF, flags, target >> 32, 0)
        else:
            block += struct.pack(">IHH", target & 0xFFFFFFFF, 0, flags)
            block += struct.pack(">I", target >> 32) if is64 else b""
            block += b"\0\0" if v2 else b""
        block += b"" if same_uuid else bytes(16)
        expect.append((target, flags))
    bs = 4096
    block += bytes(bs - len(block))
    assert ext_journal._tags(bytes(block), bs, incompat) == expect


def test_large_sparse_fs_is_fast_and_exact(tmp_path: Path) -> None:
    """Guard against a per-block Python loop: a sparse 256 GiB ext4 maps in well under 1 s."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(256 << 30)
    run("mke2fs", "-q", "-F", "-t", "ext4", "-E",
        "nodiscard,lazy_itable_init=1,lazy_journal_init=1", str(image))
    t = time.perf_counter()
    bmap = build_map(image)
    assert time.perf_counter() - t < 1.0
    bs, nblocks, ref = dumpe2fs_used(image)
    assert np.array_equal(map_used_per_block(bmap, bs, nblocks), ref)
