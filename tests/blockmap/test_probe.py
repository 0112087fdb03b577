"""Filesystem identification and the "all used, and why" fallback of probe.block_map_for."""

from __future__ import annotations

import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from blockmap.ext_helpers import mkfs, random_file
from support import have_tool

from diskvault.blockmap import ext, probe
from diskvault.blockmap.base import BlockMap
from diskvault.errors import BlockMapError
from diskvault.source.reader import FileRangeReader

MiB = 1 << 20


def _luks(path: Path) -> None:
    """A LUKS1 header (magic, version, cipher, UUID) over random key material."""
    random_file(path, 4 * MiB)
    with open(path, "r+b") as f:
        f.write(b"LUKS\xba\xbe\x00\x01" + b"aes".ljust(32, b"\0") + b"xts-plain64".ljust(32, b"\0"))
        f.seek(168)
        f.write(b"12345678-1234-1234-1234-123456789abc")


def _mk(tool: list[str], size: int) -> Callable[[Path], None]:
    """A maker: random bytes (stale data), then the mkfs tool over them."""
    def make(path: Path) -> None:
        random_file(path, size)
        subprocess.run([*tool, str(path)], check=True, capture_output=True)

    return make


MAKERS = {
    "ext2": (lambda p: mkfs(p, 8 * MiB, "-t", "ext2"), ["mke2fs"]),
    "ext3": (lambda p: mkfs(p, 8 * MiB, "-t", "ext3"), ["mke2fs"]),
    "ext4": (lambda p: mkfs(p, 8 * MiB, "-t", "ext4"), ["mke2fs"]),
    "ext4-nojournal": (lambda p: mkfs(p, 8 * MiB, "-t", "ext4", "-O", "^has_journal"),
                       ["mke2fs"]),
    "swap": (_mk(["mkswap", "-q"], 8 * MiB), ["mkswap"]),
    "vfat16": (_mk(["mkfs.vfat", "-F", "16"], 16 * MiB), ["mkfs.vfat"]),
    "vfat32": (_mk(["mkfs.vfat", "-F", "32"], 40 * MiB), ["mkfs.vfat"]),
    "vfat12": (_mk(["mkfs.vfat", "-F", "12"], 4 * MiB), ["mkfs.vfat"]),
    "ntfs": (_mk(["mkntfs", "-q", "-F", "-Q"], 16 * MiB), ["mkntfs"]),
    "xfs": (_mk(["mkfs.xfs", "-q", "-f"], 300 * MiB), ["mkfs.xfs"]),
    "btrfs": (_mk(["mkfs.btrfs", "-q", "-f"], 128 * MiB), ["mkfs.btrfs"]),
    "luks": (_luks, []),
}


def _reader(path: Path, offset: int = 0, size: int | None = None) -> FileRangeReader:
    return FileRangeReader.open(str(path), offset, size)


def _blkid_type(path: Path) -> str | None:
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_detect_fs_agrees_with_blkid(kind: str, tmp_path: Path) -> None:
    make, tools = MAKERS[kind]
    missing = [t for t in [*tools, "blkid"] if not have_tool(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    image = tmp_path / "fs.img"
    make(image)
    want = _blkid_type(image)
    assert want is not None
    r = _reader(image)
    try:
        assert probe.detect_fs(r) == want
        bmap = probe.block_map_for(r)  # whatever parser exists: a map of the right shape
    finally:
        r.close()
    assert bmap.fs_type == want and bmap.size == image.stat().st_size
    # a fresh filesystem has free space: "all used" must come with its reason
    assert bmap.note or not bmap.is_all_used
    if kind.startswith(("ext", "swap")):  # the parsers of this package
        assert bmap.note == "" and not bmap.is_all_used


def test_unknown_data_is_all_used(tmp_path: Path) -> None:
    image = tmp_path / "junk.img"
    random_file(image, 2 * MiB)
    r = _reader(image)
    try:
        assert probe.detect_fs(r) is None
        bmap = probe.block_map_for(r)
    finally:
        r.close()
    assert bmap.is_all_used and bmap.note == "unknown filesystem: all blocks read"


def test_luks_is_all_used(tmp_path: Path) -> None:
    image = tmp_path / "luks.img"
    _luks(image)
    r = _reader(image)
    try:
        assert probe.detect_fs(r) == "crypto_LUKS"
        bmap = probe.block_map_for(r)
    finally:
        r.close()
    assert bmap.is_all_used and bmap.fs_type == "crypto_LUKS"
    assert bmap.note == "encrypted (LUKS): all blocks read"


@pytest.fixture
def ext4_image(tmp_path: Path) -> Path:
    image = tmp_path / "fs.img"
    mkfs(image, 16 * MiB, "-t", "ext4", "-b", "4096")
    return image


def test_ext4_map_through_probe(ext4_image: Path) -> None:
    r = _reader(ext4_image)
    try:
        via_probe, direct = probe.block_map_for(r), ext.build(r)
    finally:
        r.close()
    assert via_probe.fs_type == "ext4" and via_probe.note == ""
    assert not via_probe.is_all_used
    assert np.array_equal(via_probe.bits, direct.bits)


def test_ext4_inside_a_partition_window(ext4_image: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    random_file(disk, 2 * MiB)
    with open(disk, "ab") as f:
        f.write(ext4_image.read_bytes())
    r = _reader(disk, 2 * MiB, 16 * MiB)
    try:
        assert probe.detect_fs(r) == "ext4"
        assert not probe.block_map_for(r).is_all_used
    finally:
        r.close()


def test_ambiguous_signatures_are_all_used(ext4_image: Path) -> None:
    """An ext4 that also carries an NTFS boot-sector signature: refuse to guess."""
    with open(ext4_image, "r+b") as f:
        f.seek(3)
        f.write(b"NTFS    ")
    r = _reader(ext4_image)
    try:
        assert probe.detect_fs(r) is None
        bmap = probe.block_map_for(r)
    finally:
        r.close()
    assert bmap.is_all_used and "ambiguous" in bmap.note and "ext4" in bmap.note


def test_broken_ext_falls_back_with_reason(ext4_image: Path) -> None:
    with open(ext4_image, "r+b") as f:  # blocks per group 0: nonsense geometry
        f.seek(1024 + 0x20)
        f.write(b"\0\0\0\0")
    r = _reader(ext4_image)
    try:
        bmap = probe.block_map_for(r)
    finally:
        r.close()
    assert bmap.is_all_used and bmap.fs_type == "ext4"
    assert "blocks per group" in bmap.note


def test_parser_crash_falls_back(ext4_image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(reader: object) -> BlockMap:
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(ext, "build", boom)
    r = _reader(ext4_image)
    try:
        bmap = probe.block_map_for(r)
    finally:
        r.close()
    assert bmap.is_all_used
    assert bmap.note == "ext4 parser failed (IndexError: index 7 is out of bounds): all blocks read"


def test_type_without_a_parser_is_all_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recognised type with no parser (as LVM or exFAT are): all used, with a note."""
    monkeypatch.delitem(probe.PARSERS, "ntfs")
    reader = _BytesReader(b"\xeb\x52\x90NTFS    " + bytes(4 * MiB))
    assert probe.detect_fs(reader) == "ntfs"
    bmap = probe.block_map_for(reader)
    assert bmap.is_all_used and bmap.fs_type == "ntfs"
    assert bmap.note == "no block map parser for ntfs: all blocks read"


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def pread(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


@pytest.fixture
def fake_parser(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in parser module for the "xfs" type, to exercise the dispatcher's checks."""
    mod = types.ModuleType("diskvault.blockmap.fake_xfs_for_tests")
    monkeypatch.setitem(probe.PARSERS, "xfs", mod)
    return mod


XFS = _BytesReader(b"XFSB" + bytes(2 * MiB - 4))


def test_parser_that_rejects_the_signature(fake_parser: types.ModuleType) -> None:
    fake_parser.detect = lambda r: False
    fake_parser.build = lambda r: pytest.fail("build must not run")
    bmap = probe.block_map_for(XFS)
    assert bmap.is_all_used and "parser rejects it" in bmap.note


@pytest.mark.parametrize("bad", ["short", "wrong-size", "not-a-map"])
def test_parser_returning_a_misfit_map(fake_parser: types.ModuleType, bad: str) -> None:
    def build(r: _BytesReader) -> object:
        if bad == "short":
            return BlockMap.empty(r.size - 4096, 4096, "xfs")
        if bad == "wrong-size":
            m = BlockMap.empty(r.size, 4096, "xfs")
            m.bits = m.bits[:-1]
            return m
        return [(0, r.size)]

    fake_parser.detect = lambda r: True
    fake_parser.build = build
    bmap = probe.block_map_for(XFS)
    assert bmap.is_all_used and "does not fit" in bmap.note


def test_parser_blockmaperror_note_is_passed_on(fake_parser: types.ModuleType) -> None:
    def build(r: object) -> BlockMap:
        raise BlockMapError("xfs log is dirty: all blocks read")

    fake_parser.detect = lambda r: True
    fake_parser.build = build
    bmap = probe.block_map_for(XFS)
    assert bmap.is_all_used and bmap.note == "xfs log is dirty: all blocks read"
    assert bmap.fs_type == "xfs"


def test_good_parser_map_is_returned(fake_parser: types.ModuleType) -> None:
    def build(r: _BytesReader) -> BlockMap:
        m = BlockMap.empty(r.size, 4096, "whatever")
        m.mark_used(0, 3)
        return m

    fake_parser.detect = lambda r: True
    fake_parser.build = build
    bmap = probe.block_map_for(XFS)
    assert bmap.fs_type == "xfs" and bmap.used_bytes() == 3 * 4096 and bmap.note == ""


def test_unreadable_device_is_all_used() -> None:
    class Failing(_BytesReader):
        def pread(self, offset: int, size: int) -> bytes:
            if offset >= 1024:
                raise OSError(5, "Input/output error")
            return super().pread(offset, size)

    r = Failing(bytes(1 * MiB))
    assert probe.detect_fs(r) is None
    bmap = probe.block_map_for(r)
    assert bmap.is_all_used and "Input/output error" in bmap.note
