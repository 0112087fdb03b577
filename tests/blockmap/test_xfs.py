"""XFS block map, proven as BLOCKMAPS.md says: mkfs.xfs over non-zero bytes, filled through
a loop mount, some files deleted; compared with xfs_db's free-space walk and partclone,
restored used-only, checked by xfs_repair and by every file's hash. A dirty log must
never pass: we refuse exactly when xfs_repair says the log holds unreplayed changes."""

from __future__ import annotations

import hashlib
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
    partclone_used,
    prefill,
    remove_images,
    stale_fraction,
    tree_hashes,
    used_blocks,
    write_files,
)
from blockmap.verify import restore_used_only
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import loop_device, needs_loop, needs_tool

from diskvault.blockmap import xfs
from diskvault.errors import BlockMapError
from diskvault.source.reader import FileRangeReader

SIZE = 320 << 20  # mkfs.xfs refuses less than 300 MB

pytestmark = [needs_loop, needs_tool("mkfs.xfs", "xfs_db", "xfs_repair", "xfs_io")]


@pytest.fixture(autouse=True)
def _drop_images(tmp_path):
    yield
    remove_images(str(tmp_path))


def _mkfs(path: str, *opts: str, seed: int = 0) -> None:
    prefill(path, SIZE, seed)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-K", *opts, path], check=True,
                   capture_output=True)


def _fill(path: str, mnt: str, seed: int) -> dict[str, str]:
    with loop_device(path) as dev, mounted(dev, mnt):
        files = write_files(mnt, seed, 36, 3_000_000)
        delete_some(mnt, files)
    return files


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    d = tmp_path_factory.mktemp("xfs")
    path = str(d / "xfs.img")
    _mkfs(path, seed=1)
    yield path, _fill(path, str(d / "mnt"), 1)
    remove_images(str(d))


def _copy(src: str, tmp_path, name: str = "copy.img") -> str:
    dst = str(tmp_path / name)
    shutil.copyfile(src, dst)
    return dst


def _xfs_db(path: str, *cmds: str) -> str:
    args = ["xfs_db", "-r"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args + [path], check=True, capture_output=True, text=True).stdout


def _reference_free(path: str, sb: xfs.Super) -> tuple[set[int], set[int]]:
    """(blocks xfs_db's ``freesp -d`` lists, AGFL blocks) as absolute block numbers."""
    free: set[int] = set()
    for line in _xfs_db(path, "freesp -d").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit():
            agno, agbno, length = map(int, parts)
            free.update(range(agno * sb.agblocks + agbno, agno * sb.agblocks + agbno + length))
    agfl: set[int] = set()
    for agno in range(sb.agcount):
        out = _xfs_db(path, f"agf {agno}", "p flfirst flcount", f"agfl {agno}", "p bno")
        first = int(re.search(r"flfirst = (\d+)", out).group(1))
        count = int(re.search(r"flcount = (\d+)", out).group(1))
        slots = dict(re.findall(r"(\d+):(\d+)", out.split("bno", 1)[1]))
        size = int(re.search(r"bno\[0-(\d+)\]", out).group(1)) + 1
        for i in range(count):
            agfl.add(agno * sb.agblocks + int(slots[str((first + i) % size)]))
    return free, agfl


def _super(path: str) -> xfs.Super:
    with open(path, "rb") as f:
        return xfs.parse_super(f.read(512), os.path.getsize(path))


def _check_against_xfs_db(path: str) -> None:
    sb = _super(path)
    bmap = build_map(xfs, path)
    ours_free = set(np.flatnonzero(~used_blocks(bmap, sb.block)).tolist())
    ref_free, agfl = _reference_free(path, sb)
    assert agfl and agfl <= ref_free
    # the AGFL's blocks are free but reserved for btree growth: kept, on purpose
    assert ours_free == ref_free - agfl


def test_detect(image) -> None:
    r = FileRangeReader.open(image[0])
    try:
        assert xfs.detect(r)
    finally:
        r.close()


def test_map_matches_xfs_db_and_partclone(image, tmp_path) -> None:
    path, _files = image
    _check_against_xfs_db(path)
    if shutil.which("partclone.xfs"):
        bmap = build_map(xfs, path)
        ours = used_blocks(bmap, bmap.block_size)
        ref = partclone_used("partclone.xfs", path, bmap.block_size, str(tmp_path))
        assert not (ref & ~ours).any()
        _free, agfl = _reference_free(path, _super(path))
        assert set(np.flatnonzero(ours & ~ref).tolist()) == agfl


def _prove_restore(path: str, files: dict[str, str], tmp_path) -> None:
    bmap = build_map(xfs, path)
    assert stale_fraction(path, bmap) > 0.97
    restored = str(tmp_path / "restored.img")
    assert restore_used_only(path, bmap, restored) == bmap.used_bytes()
    rep = subprocess.run(["xfs_repair", "-n", "-f", restored], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    with loop_device(restored, read_only=True) as dev, \
            mounted(dev, str(tmp_path / "mnt-restored"), "-o", "ro,norecovery") as mnt:
        assert tree_hashes(mnt) == files


def test_restore_used_only_is_identical(image, tmp_path) -> None:
    _prove_restore(*image, tmp_path)


def _fragment(mnt: str, seed: int) -> dict[str, str]:
    """Many small files, written out, then every other one deleted: many free extents."""
    rng = np.random.default_rng(seed)
    files: dict[str, str] = {}
    os.makedirs(os.path.join(mnt, "frag"))
    for i in range(1500):
        data = rng.bytes(3000)
        with open(os.path.join(mnt, "frag", f"f{i}"), "wb") as f:
            f.write(data)
        files[os.path.join("frag", f"f{i}")] = hashlib.sha256(data).hexdigest()
    os.sync()  # allocate them now: delayed allocation would skip the deleted ones
    for i in range(0, 1500, 2):
        os.remove(os.path.join(mnt, "frag", f"f{i}"))
        del files[os.path.join("frag", f"f{i}")]
    return files


@pytest.mark.parametrize("opts", [["-b", "size=1024", "-d", "agcount=2"],
                                  ["-s", "size=4096"]], ids=["1k-blocks", "4k-sectors"])
def test_fragmented_free_space(tmp_path, opts: list[str]) -> None:
    """Hundreds of free extents: with 1 KiB blocks the free-space btree has two levels."""
    path = str(tmp_path / "frag.img")
    _mkfs(path, *opts, seed=5)
    with loop_device(path) as dev, mounted(dev, str(tmp_path / "mnt")) as mnt:
        files = _fragment(mnt, 5)
    if opts[1] == "size=1024":
        assert "bnolevel = 2" in _xfs_db(path, "agf 0", "p bnolevel")
    _check_against_xfs_db(path)
    _prove_restore(path, files, tmp_path)


def _repair_says_dirty(path: str) -> bool:
    out = subprocess.run(["xfs_repair", "-n", "-f", path], capture_output=True, text=True)
    return "valuable metadata changes in a log" in out.stderr


def test_dirty_log_refused(image, tmp_path) -> None:
    """Snapshots of a mounted filesystem, and a crashed one: refused, as xfs_repair
    would ask for a log replay; after the replay the map is accepted again."""
    path = _copy(image[0], tmp_path)
    mnt = str(tmp_path / "mnt")
    snaps = []
    with loop_device(path) as dev:
        with mounted(dev, mnt):
            write_files(os.path.join(mnt, "more"), 5, 9, 400_000)
            os.sync()
            snaps.append(_copy(path, tmp_path, "live.img"))
            subprocess.run(["fsfreeze", "-f", mnt], check=True)
            try:
                snaps.append(_copy(path, tmp_path, "frozen.img"))
            finally:
                subprocess.run(["fsfreeze", "-u", mnt], check=True)
            write_files(os.path.join(mnt, "last"), 6, 6, 100_000)
            subprocess.run(["xfs_io", "-x", "-c", "shutdown", mnt], check=True)
        snaps.append(path)  # crashed: shut down without flushing the log
    live, frozen, crashed = snaps
    for snap in (live, crashed):
        assert _repair_says_dirty(snap), snap
        with pytest.raises(BlockMapError, match="dirty"):
            build_map(xfs, snap)
    # whether freezing leaves a clean log depends on the kernel: agree with xfs_repair
    if _repair_says_dirty(frozen):
        with pytest.raises(BlockMapError, match="dirty"):
            build_map(xfs, frozen)
    else:
        _check_against_xfs_db(frozen)
    with loop_device(path) as dev, mounted(dev, mnt):  # replays the log
        pass
    assert not _repair_says_dirty(path)
    _check_against_xfs_db(path)


def test_wrapped_log_cycle(tmp_path) -> None:
    """A log on its fifth pass, whose tail holds the previous pass's records."""
    path = str(tmp_path / "wrapped.img")
    _mkfs(path, seed=3)
    subprocess.run(["xfs_db", "-x", "-c", "logformat -c 5", path], check=True,
                   capture_output=True)
    _check_against_xfs_db(path)
    _fill(path, str(tmp_path / "mnt"), 3)
    assert not _repair_says_dirty(path)
    _check_against_xfs_db(path)


def test_v4_filesystem(tmp_path) -> None:
    """Pre-CRC format (ABTB btree blocks). This kernel cannot mount v4, so the proof is
    the map against xfs_db plus xfs_repair of the used-only restore."""
    path = str(tmp_path / "v4.img")
    _mkfs(path, "-m", "crc=0", seed=4)
    assert _super(path).version == 4
    _check_against_xfs_db(path)
    restored = str(tmp_path / "restored.img")
    restore_used_only(path, build_map(xfs, path), restored)
    assert subprocess.run(["xfs_repair", "-n", "-f", restored],
                          capture_output=True).returncode == 0


def test_external_log_and_realtime_refused(tmp_path) -> None:
    for opt, name in (("-l", "logdev"), ("-r", "rtdev")):
        other = str(tmp_path / f"{name}.img")
        with open(other, "wb") as f:
            f.truncate(64 << 20)
        path = str(tmp_path / f"data-{name}.img")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-K", opt, f"{name}={other}", path],
                       check=True, capture_output=True)
        with pytest.raises(BlockMapError, match="external log" if name == "logdev"
                           else "realtime"):
            build_map(xfs, path)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_inconsistent_metadata_refused(image, tmp_path) -> None:
    sb = _super(image[0])
    agf1 = sb.agblocks * sb.block + sb.sect  # AG 1's AGF
    path = _copy(image[0], tmp_path)
    with open(path, "rb") as f:
        f.seek(agf1 + 52)
        freeblks = struct.unpack(">I", f.read(4))[0]
    _patch(path, agf1 + 52, struct.pack(">I", freeblks + 1))
    with pytest.raises(BlockMapError, match="add up"):
        build_map(xfs, path)

    path = _copy(image[0], tmp_path)
    with open(path, "rb") as f:
        f.seek(agf1 + 16)
        bno_root = struct.unpack(">I", f.read(4))[0]
    _patch(path, (sb.agblocks + bno_root) * sb.block, b"XXXX")
    with pytest.raises(BlockMapError, match="free-space btree block"):
        build_map(xfs, path)

    with pytest.raises(BlockMapError, match="exceeds"):
        build_map(xfs, image[0], SIZE - (1 << 20))


def test_garbage_superblock_refused() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        buf = bytearray(rng.bytes(1 << 20))
        buf[0:4] = b"XFSB"
        with pytest.raises(BlockMapError):
            xfs.build(MemReader(buf))
    with pytest.raises(BlockMapError):
        xfs.build(MemReader(b"XFSB"))


class _Patched:
    """A reader over an image with a few bytes changed in memory."""

    def __init__(self, base: FileRangeReader, patches: dict[int, int]) -> None:
        self.base, self.patches, self.size = base, patches, base.size

    def pread(self, offset: int, size: int) -> bytes:
        data = bytearray(self.base.pread(offset, size))
        for pos, val in self.patches.items():
            if offset <= pos < offset + len(data):
                data[pos - offset] = val
        return bytes(data)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.tuples(st.integers(0, 3), st.sampled_from(["agf", "bno", "sb"]),
                                 st.integers(0, 255)),
                       st.integers(0, 255), min_size=1, max_size=4))
def test_corruption_never_crashes(image, flips) -> None:
    """Damage in superblock, AGF or btree root: a map or BlockMapError, nothing else."""
    base = FileRangeReader.open(image[0])
    try:
        sb = xfs.parse_super(base.pread(0, 512), base.size)
        patches = {}
        for (agno, where, off), val in flips.items():
            ag = agno * sb.agblocks * sb.block
            if where == "sb":
                pos = off
            elif where == "agf":
                pos = ag + sb.sect + off
            else:
                root = struct.unpack(">I", base.pread(ag + sb.sect + 16, 4))[0]
                pos = ag + root * sb.block + off
            patches[pos] = val
        try:
            xfs.build(_Patched(base, patches))
        except BlockMapError:
            pass
    finally:
        base.close()
