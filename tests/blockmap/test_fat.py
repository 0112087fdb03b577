"""FAT12/16/32 block map, proven as BLOCKMAPS.md says: mkfs.fat over random bytes, filled
with mtools, some files deleted; compared with partclone and fsck.fat, restored
used-only, checked by fsck.fat and by every file's hash (copied out with mtools)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
from blockmap.ntfs_fat_xfs_helpers import (
    MemReader,
    build_map,
    partclone_used,
    prefill,
    remove_images,
    stale_fraction,
    tree_hashes,
    used_blocks,
    write_files,
)
from blockmap.verify import restore_used_only
from hypothesis import given, settings
from hypothesis import strategies as st
from support import needs_tool

from diskvault.blockmap import fat
from diskvault.errors import BlockMapError

BAD_KIB = (3000, 3001, 5000)
MTOOLS_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")
# (label, image MiB, mkfs.fat options, partclone agrees): partclone.fat miscounts FAT12
CONFIGS = [
    ("fat12", 8, ["-F", "12"], False),
    ("fat12-unaligned", 8, ["-F", "12", "-a", "-R", "3", "-s", "4"], False),
    ("fat16-2k-sectors-badblocks", 64, ["-F", "16", "-S", "2048", "-l", "BAD"], True),
    ("fat32", 100, ["-F", "32"], True),
]

pytestmark = needs_tool("mkfs.fat", "fsck.fat", "mcopy", "mdel", "partclone.fat")


@pytest.fixture(autouse=True)
def _drop_images(tmp_path):
    yield
    remove_images(str(tmp_path))


def _mtools(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True,
                          env=MTOOLS_ENV).stdout


def _make_image(d: str, mib: int, opts: list[str], seed: int) -> tuple[str, dict[str, str]]:
    path = os.path.join(d, "fat.img")
    prefill(path, mib << 20, seed)
    bad = os.path.join(d, "bad.txt")
    with open(bad, "w") as f:  # 1 KiB block numbers for mkfs.fat -l
        f.write("".join(f"{kib}\n" for kib in BAD_KIB))
    opts = [bad if o == "BAD" else o for o in opts]
    subprocess.run(["mkfs.fat", *opts, path], check=True, capture_output=True)
    src = os.path.join(d, "src")
    files = write_files(src, seed, 30, mib * 20_000)
    _mtools("mcopy", "-s", "-i", path, os.path.join(src, "sub"), "::/")
    for name in files:
        if os.sep not in name:
            _mtools("mcopy", "-i", path, os.path.join(src, name), "::/" + name)
    for i, name in enumerate(sorted(files)):  # free space now holds stale file data
        if i % 3 == 1:
            _mtools("mdel", "-i", path, "::/" + name.replace(os.sep, "/"))
            del files[name]
    return path, files


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def image(request, tmp_path_factory):
    label, mib, opts, partclone_ok = request.param
    d = str(tmp_path_factory.mktemp(label))
    path, files = _make_image(d, mib, opts, CONFIGS.index(request.param))
    yield path, files, partclone_ok, opts
    remove_images(d)


def _fsck_used_clusters(path: str) -> tuple[int, int]:
    out = subprocess.run(["fsck.fat", "-n", path], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)/(\d+) clusters", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def test_map_matches_references(image, tmp_path) -> None:
    path, _files, partclone_ok, opts = image
    bmap = build_map(fat, path)
    with open(path, "rb") as f:
        g = fat.parse_boot(f.read(512), os.path.getsize(path))
    cluster = g.sector * g.spc
    data_end = (g.data_start + g.clusters * g.spc) * g.sector
    in_data = [r for r in bmap.used_ranges(g.data_start * g.sector, data_end)]
    used, total = _fsck_used_clusters(path)
    assert total == g.clusters
    assert sum(length for _o, length in in_data) == used * cluster  # bad clusters too
    assert bmap.used_ranges(0, g.data_start * g.sector) == [(0, g.data_start * g.sector)]
    if partclone_ok:
        unit = bmap.block_size
        ours = used_blocks(bmap, unit)
        ref = partclone_used("partclone.fat", path, unit, str(tmp_path))
        n = data_end // unit  # partclone stops at the last cluster; we keep the rest
        assert not (ref[:n] & ~ours[:n]).any()
        # partclone skips bad clusters; they are used here (their entries are not zero)
        bad = {kib * 1024 // unit for kib in BAD_KIB} if "BAD" in opts else set()
        assert set(np.flatnonzero(ours[:n] & ~ref[:n]).tolist()) == bad
        assert ours[n:].all()


def test_block_unit_aligns_data_area_and_clusters(image) -> None:
    path, _files, _, _ = image
    bmap = build_map(fat, path)
    with open(path, "rb") as f:
        g = fat.parse_boot(f.read(512), os.path.getsize(path))
    unit = bmap.block_size // g.sector
    assert g.data_start % unit == 0 and g.spc % unit == 0
    assert unit == g.spc or g.data_start % (2 * unit)  # the largest such power of two
    if g.data_start == 59:  # the unaligned image: data area at an odd sector
        assert bmap.block_size == g.sector


def test_restore_used_only_is_identical(image, tmp_path) -> None:
    path, files, _, _ = image
    bmap = build_map(fat, path)
    assert stale_fraction(path, bmap) > 0.97
    restored = str(tmp_path / "restored.img")
    assert restore_used_only(path, bmap, restored) == bmap.used_bytes()
    fsck = subprocess.run(["fsck.fat", "-n", restored], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = str(tmp_path / "out")
    os.makedirs(out)
    _mtools("mcopy", "-s", "-i", restored, "::/*", out)
    assert tree_hashes(out) == files


def test_bad_clusters_are_used(tmp_path) -> None:
    path, _files = _make_image(str(tmp_path), 64, CONFIGS[2][2], 7)
    bmap = build_map(fat, path)
    for kib in BAD_KIB:  # the blocks mkfs.fat was told are bad
        assert bmap.used_ranges(kib * 1024, kib * 1024 + 1024) == [(kib * 1024, 1024)]
    out = subprocess.run(["fsck.fat", "-n", "-v", path], capture_output=True, text=True)
    assert out.returncode == 0


def test_any_fat_copy_marks_used(image, tmp_path) -> None:
    """Zero the first FAT's entries: the second copy still says used, and it wins."""
    path = str(tmp_path / "copy.img")
    shutil.copyfile(image[0], path)
    before = build_map(fat, path)
    with open(path, "r+b") as f:
        g = fat.parse_boot(f.read(512), os.path.getsize(path))
        f.seek(g.fat_start * g.sector + 64)  # leaves entries 0/1 and the root alone
        f.write(bytes(g.fat_sectors * g.sector - 64))
    assert subprocess.run(["fsck.fat", "-n", path], capture_output=True).returncode != 0
    assert np.array_equal(build_map(fat, path).bits, before.bits)


def _patched(src: str, tmp_path, offset: int, fmt: str, value: int) -> str:
    path = str(tmp_path / "bad.img")
    shutil.copyfile(src, path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return path


def test_inconsistent_geometry_refused(image, tmp_path) -> None:
    path = image[0]
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        g = fat.parse_boot(f.read(512), size)
    with pytest.raises(BlockMapError, match="exceeds"):  # truncated partition
        build_map(fat, path, size - 65536)
    fat_size_ofs, fmt = (0x24, "<I") if g.bits == 32 else (0x16, "<H")
    with pytest.raises(BlockMapError, match="too small"):
        build_map(fat, _patched(path, tmp_path, fat_size_ofs, fmt, 1))
    with pytest.raises(BlockMapError, match="sectors per cluster"):
        build_map(fat, _patched(path, tmp_path, 0x0D, "<B", 3))
    with pytest.raises(BlockMapError, match="signature"):
        build_map(fat, _patched(path, tmp_path, 510, "<H", 0))


def test_detect_rejects_other_data() -> None:
    assert not fat.detect(MemReader(bytes(1 << 20)))
    ntfs_boot = bytearray(1 << 20)
    ntfs_boot[0:11] = b"\xebR\x90NTFS    "
    ntfs_boot[510:512] = b"\x55\xaa"
    assert not fat.detect(MemReader(ntfs_boot))
    with pytest.raises(BlockMapError):  # shorter than a boot sector
        fat.build(MemReader(bytes(100)))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=59, max_size=59))
def test_random_bpb_never_crashes(bpb: bytes) -> None:
    """Any BPB behind a plausible jump and signature: a map or BlockMapError."""
    boot = (b"\xeb\x3c\x90" + bpb).ljust(510, b"\0") + b"\x55\xaa"

    class Mem:
        size = 4 << 20

        def pread(self, offset: int, size: int) -> bytes:
            end = min(offset + size, self.size)
            head = boot[offset:end] if offset < 512 else b""
            return head + bytes(max(0, end - max(offset, 512)))

    try:
        bmap = fat.build(Mem())
        assert bmap.size == Mem.size
    except BlockMapError:
        pass
