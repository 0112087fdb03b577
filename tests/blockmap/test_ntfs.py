"""NTFS block map, proven as BLOCKMAPS.md says: real mkntfs images over random bytes,
compared with ntfsclone, restored used-only, checked by ntfsfix and by every file's hash."""

from __future__ import annotations

import os
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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import loop_device, needs_loop, needs_tool

from diskvault.blockmap import ntfs
from diskvault.errors import BlockMapError

SIZE = 64 << 20
# (mkntfs options, label): cluster = sector, the default, 4 KiB sectors, huge clusters
CONFIGS = [(["-c", "512"], "c512"), (["-c", "4096"], "c4k"),
           (["-s", "4096", "-c", "4096"], "s4k"), (["-c", "65536"], "c64k")]

pytestmark = [needs_loop, needs_tool("mkntfs", "ntfs-3g", "ntfsclone", "ntfsfix", "ntfsinfo")]


@pytest.fixture(autouse=True)
def _drop_images(tmp_path):
    yield
    remove_images(str(tmp_path))


def _make_image(path: str, opts: list[str], seed: int, mnt: str) -> dict[str, str]:
    prefill(path, SIZE, seed)
    subprocess.run(["mkntfs", "-F", "-Q", "-q", *opts, path], check=True, capture_output=True)
    with loop_device(path) as dev, mounted(dev, mnt, fuse=True):
        files = write_files(mnt, seed, 45, 1_500_000)
        delete_some(mnt, files)
    return files


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[1] for c in CONFIGS])
def image(request, tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    d = tmp_path_factory.mktemp(f"ntfs-{request.param[1]}")
    path = str(d / "ntfs.img")
    files = _make_image(path, request.param[0], CONFIGS.index(request.param), str(d / "mnt"))
    yield path, files
    remove_images(str(d))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """One default-geometry image for the refusal tests (each works on a copy)."""
    d = tmp_path_factory.mktemp("ntfs-plain")
    path = str(d / "ntfs.img")
    yield path, _make_image(path, [], 99, str(d / "mnt"))
    remove_images(str(d))


def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "copy.img")
    shutil.copyfile(src, dst)
    return dst


def ntfsclone_used(image: str, unit: int, workdir: str) -> np.ndarray:
    """Blocks ntfsclone copies: it writes used clusters and leaves holes for the rest."""
    out_path = os.path.join(workdir, "ntfsclone.out")
    subprocess.run(["ntfsclone", "-q", "-O", out_path, image], check=True, capture_output=True)
    size = os.path.getsize(out_path)
    assert os.stat(out_path).st_blocks * 512 < size // 2, "no holes: comparison is void"
    used = np.zeros(size // unit, dtype=bool)
    fd = os.open(out_path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            used[data // unit : (hole + unit - 1) // unit] = True
            pos = hole
    finally:
        os.close(fd)
    os.remove(out_path)
    return used


def _ntfsinfo_runs(image: str, inode: int) -> list[tuple[int, int]]:
    """(lcn, length) of an inode's first non-resident attribute, as ntfsinfo prints it."""
    out = subprocess.run(["ntfsinfo", "-i", str(inode), "-v", image], check=True,
                         capture_output=True, text=True).stdout
    lines = out.split("Runlist:", 1)[1].splitlines()[1:]
    runs = []
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or not parts[0].startswith("0x"):
            break
        runs.append((int(parts[1], 16), int(parts[2], 16)))
    return runs


def test_detect(plain) -> None:
    from diskvault.source.reader import FileRangeReader

    r = FileRangeReader.open(plain[0])
    try:
        assert ntfs.detect(r)
    finally:
        r.close()


def test_map_matches_ntfsclone(image, tmp_path) -> None:
    path, _files = image
    bmap = build_map(ntfs, path)
    # ntfsclone's holes are at the host filesystem's 4 KiB granularity
    ours = used_blocks(bmap, 4096)
    ref = ntfsclone_used(path, 4096, str(tmp_path))
    assert np.array_equal(ours, ref), (np.flatnonzero(ours != ref)[:20])
    assert 0 < bmap.used_bytes() < bmap.size // 2


def test_restore_used_only_is_identical(image, tmp_path) -> None:
    path, files = image
    bmap = build_map(ntfs, path)
    assert stale_fraction(path, bmap) > 0.97  # free space really held old data
    restored = str(tmp_path / "restored.img")
    copied = restore_used_only(path, bmap, restored)
    assert copied == bmap.used_bytes()
    fix = subprocess.run(["ntfsfix", "-n", restored], capture_output=True, text=True)
    assert fix.returncode == 0, fix.stdout + fix.stderr
    with loop_device(restored, read_only=True) as dev, \
            mounted(dev, str(tmp_path / "mnt"), "-o", "ro", fuse=True) as mnt:
        assert tree_hashes(mnt) == files


def test_dirty_volume_refused(plain, tmp_path) -> None:
    path = _copy(plain[0], tmp_path)
    clean = build_map(ntfs, path)
    subprocess.run(["ntfsfix", path], check=True, capture_output=True)  # schedules chkdsk
    ref = subprocess.run(["ntfsclone", "--save-image", "-o", "/dev/null", path],
                         capture_output=True, text=True)
    assert ref.returncode != 0  # ntfsclone refuses it too
    with pytest.raises(BlockMapError, match="dirty"):
        build_map(ntfs, path)
    subprocess.run(["ntfsfix", "-d", path], check=True, capture_output=True)
    assert np.array_equal(build_map(ntfs, path).bits, clean.bits)


@pytest.mark.parametrize("header,refused", [(b"HIBR", True), (b"hibr", True),
                                            (b"wake", False), (b"\0\0\0\0", False)])
def test_hibernated_windows_refused(plain, tmp_path, header: bytes, refused: bool) -> None:
    path = _copy(plain[0], tmp_path)
    mnt = str(tmp_path / "mnt")
    with loop_device(path) as dev:
        with mounted(dev, mnt, fuse=True), open(os.path.join(mnt, "hiberfil.sys"), "wb") as f:
            f.write(header + os.urandom(64 << 10))
        if refused:  # the reference: ntfs-3g will not mount it read-write either (it
            # falls back to read-only and says why)
            os.makedirs(mnt, exist_ok=True)
            r = subprocess.run(["ntfs-3g", dev, mnt], capture_output=True, text=True)
            subprocess.run(["umount", mnt], capture_output=True)
            assert "hibernation" in r.stderr.lower(), r.stderr
    if refused:
        with pytest.raises(BlockMapError, match="hibernated"):
            build_map(ntfs, path)
    else:
        build_map(ntfs, path)


def _restart_page(in_use: int, flags: int, lsn: int) -> bytes:
    """A minimal $LogFile restart page (4 KiB) with a valid update sequence array."""
    page = bytearray(4096)
    struct.pack_into("<4sHHqIIHhh", page, 0, b"RSTR", 0x1E, 9, 0, 4096, 4096, 0x40, 1, 1)
    struct.pack_into("<qHHHH", page, 0x40, lsn, 1, 0xFFFF, in_use, flags)
    usn = b"\x07\x00"
    page[0x1E:0x20] = usn
    for i in range(1, 9):
        page[0x1E + 2 * i : 0x20 + 2 * i] = page[i * 512 - 2 : i * 512]
        page[i * 512 - 2 : i * 512] = usn
    return bytes(page)


@pytest.mark.parametrize("in_use,flags,refused", [(0, 0, True), (0, 2, False),
                                                  (0xFFFF, 0, False)])
def test_unclean_logfile_refused(plain, tmp_path, in_use: int, flags: int,
                                 refused: bool) -> None:
    path = _copy(plain[0], tmp_path)
    cluster = build_map(ntfs, path).block_size
    lcn = _ntfsinfo_runs(path, 2)[0][0]  # $LogFile
    with open(path, "r+b") as f:
        f.seek(lcn * cluster)
        f.write(_restart_page(in_use, flags, 5) + _restart_page(in_use, flags, 4))
    if refused:
        with pytest.raises(BlockMapError, match="not clean"):
            build_map(ntfs, path)
    else:
        build_map(ntfs, path)


def test_damaged_metadata_refused(plain, tmp_path) -> None:
    path = _copy(plain[0], tmp_path)
    good = build_map(ntfs, path)
    cs = good.block_size
    info = subprocess.run(["ntfsinfo", "-m", path], capture_output=True, text=True).stdout
    mft_lcn = int(info.split("LCN of Data Attribute for FILE_MFT:")[1].split()[0])
    record6 = mft_lcn * cs + 6 * 1024
    with open(path, "r+b") as f:  # a torn write in $Bitmap's MFT record
        f.seek(record6 + 510)
        f.write(b"\xAA\xBB")
    with pytest.raises(BlockMapError, match="update sequence"):
        build_map(ntfs, path)

    path = _copy(plain[0], tmp_path)
    bitmap_lcn = _ntfsinfo_runs(path, 6)[0][0]
    with open(path, "r+b") as f:  # $Bitmap claims the boot sector's cluster is free
        f.seek(bitmap_lcn * cs)
        first = f.read(1)[0]
        f.seek(bitmap_lcn * cs)
        f.write(bytes([first & 0xFE]))
    with pytest.raises(BlockMapError, match="free"):
        build_map(ntfs, path)

    with pytest.raises(BlockMapError, match="does not fit"):  # a truncated partition
        build_map(ntfs, plain[0], SIZE - (1 << 20))


def test_runlist_decoding() -> None:
    # 0x21: 1 length byte, 2 offset bytes; 0x01: sparse; negative delta back to lcn 0x10
    data = bytes([0x21, 0x08, 0x00, 0x01, 0x01, 0x04, 0x11, 0x02, 0xF0, 0x00])
    assert ntfs.decode_runlist(data, 0, 1 << 20, "t") == [
        ntfs.Run(0, 0x100, 8), ntfs.Run(8, None, 4), ntfs.Run(12, 0xF0, 2)]
    with pytest.raises(BlockMapError):  # runs past the volume's last cluster
        ntfs.decode_runlist(data, 0, 0x101, "t")
    with pytest.raises(BlockMapError):  # not terminated
        ntfs.decode_runlist(data[:-1], 0, 1 << 20, "t")


def test_garbage_boot_sector_refused() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        buf = bytearray(rng.bytes(1 << 20))
        buf[3:11], buf[510:512] = b"NTFS    ", b"\x55\xaa"
        assert ntfs.detect(MemReader(buf))
        with pytest.raises(BlockMapError):
            ntfs.build(MemReader(buf))
    with pytest.raises(BlockMapError):  # shorter than a boot sector
        ntfs.build(MemReader(bytes(100)))


@pytest.fixture(scope="module")
def plain_bytes(plain) -> bytearray:
    with open(plain[0], "rb") as f:
        return bytearray(f.read())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(flips=[("boot", 13, 0)])  # 0 sectors per cluster once divided by zero
@given(st.lists(st.tuples(st.sampled_from(["boot", "mft"]), st.integers(0, 16383),
                          st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_metadata_never_crashes(plain_bytes, flips) -> None:
    """Random byte damage in the boot sector or the first MFT records: the parser may
    succeed or raise BlockMapError, nothing else."""
    buf = plain_bytes
    bps, spc = struct.unpack_from("<HB", buf, 0x0B)
    mft = struct.unpack_from("<q", buf, 0x30)[0] * bps * spc
    saved = []
    for where, off, val in flips:
        pos = off % 512 if where == "boot" else mft + off
        saved.append((pos, buf[pos]))
        buf[pos] = val
    try:
        ntfs.build(MemReader(buf))
    except BlockMapError:
        pass
    finally:
        for pos, old in reversed(saved):
            buf[pos] = old
