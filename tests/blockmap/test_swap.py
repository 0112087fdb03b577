"""Linux swap block maps: the header page only, all of it for a hibernation image."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from blockmap.ext_helpers import random_file
from blockmap.verify import restore_used_only
from hypothesis import given, settings
from hypothesis import strategies as st
from support import needs_tool

from diskvault.blockmap import probe, swap
from diskvault.blockmap.base import BlockMap
from diskvault.errors import BlockMapError
from diskvault.source.reader import FileRangeReader

MiB = 1 << 20
UUID = "0b5b1c6e-9a0e-4a53-8d3b-6f5d2a1e7c44"


class BytesReader:
    """A RangeReader over bytes, for crafted headers."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def pread(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


def _map(path: Path, size: int | None = None) -> BlockMap:
    r = FileRangeReader.open(str(path), 0, size)
    try:
        return swap.build(r)
    finally:
        r.close()


def _blkid(path: Path) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True,
                         text=True, check=True).stdout
    tags = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    tags.pop("DEVNAME", None)
    return tags


@needs_tool("mkswap", "blkid")
@pytest.mark.parametrize("page", [4096, 65536])
def test_only_the_header_page_is_used(tmp_path: Path, page: int) -> None:
    image = tmp_path / "swap.img"
    random_file(image, 16 * MiB)  # stale "swapped-out pages" everywhere
    subprocess.run(["mkswap", "-q", "-p", str(page), "-L", "backupswap", "-U", UUID,
                    str(image)], check=True, capture_output=True)
    bmap = _map(image)
    assert bmap.fs_type == "swap" and bmap.note == ""
    assert bmap.block_size == page
    assert bmap.used_ranges(0, bmap.size) == [(0, page)]
    restored = tmp_path / "restored.img"
    assert restore_used_only(str(image), bmap, str(restored)) == page
    want = _blkid(image)
    assert want["TYPE"] == "swap" and want["UUID"] == UUID and want["LABEL"] == "backupswap"
    assert _blkid(restored) == want  # signature, version, UUID and label all survive
    with open(image, "rb") as a, open(restored, "rb") as b:
        assert a.read(page) == b.read(page)


@needs_tool("mkswap")
def test_space_past_the_swap_area_is_kept(tmp_path: Path) -> None:
    """mkswap given a size smaller than the device: what follows is not swap, so kept."""
    image = tmp_path / "swap.img"
    random_file(image, 16 * MiB)
    subprocess.run(["mkswap", "-q", "-p", "4096", str(image), str(8 * 1024)], check=True,
                   capture_output=True)
    bmap = _map(image)
    assert bmap.used_ranges(0, bmap.size) == [(0, 4096), (8 * MiB, 8 * MiB)]


@needs_tool("mkswap")
def test_truncated_swap_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "swap.img"
    random_file(image, 16 * MiB)
    subprocess.run(["mkswap", "-q", "-p", "4096", str(image)], check=True, capture_output=True)
    with pytest.raises(BlockMapError, match="truncated"):
        _map(image, 8 * MiB)
    r = FileRangeReader.open(str(image), 0, 8 * MiB)
    try:
        fallback = probe.block_map_for(r)
    finally:
        r.close()
    assert fallback.is_all_used and "truncated" in fallback.note


def _crafted(page: int, magic: bytes, header: bytes, pages: int = 64) -> BytesReader:
    data = bytearray(b"\x77" * (page * pages))
    data[1024 : 1024 + len(header)] = header
    data[page - 10 : page - 10 + len(magic)] = magic
    return BytesReader(bytes(data))


@pytest.mark.parametrize("magic", [b"S1SUSPEND\0", b"S2SUSPEND\0", b"ULSUSPEND\0",
                                   b"LINHIB0001", b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c"])
def test_hibernation_image_is_all_used(magic: bytes) -> None:
    r = _crafted(4096, magic, struct.pack("<III", 1, 63, 0))
    assert swap.detect(r)
    for bmap in (swap.build(r), probe.block_map_for(r)):
        assert bmap.is_all_used
        assert "hibernation" in bmap.note
        assert bmap.fs_type == "swap"


def test_big_endian_header() -> None:
    r = _crafted(4096, b"SWAPSPACE2", struct.pack(">III", 1, 31, 0))
    bmap = swap.build(r)
    assert bmap.used_ranges(0, r.size) == [(0, 4096), (32 * 4096, 32 * 4096)]


@pytest.mark.parametrize(
    "magic,header,match",
    [
        (b"SWAPSPACE2", struct.pack("<III", 2, 63, 0), "unknown version"),
        (b"SWAPSPACE2", struct.pack("<III", 1, 0, 0), "pages"),
        (b"SWAPSPACE2", struct.pack("<III", 1, 64, 0), "truncated"),
        (b"SWAP-SPACE", b"", "v0"),
    ],
)
def test_bad_headers_are_refused(magic: bytes, header: bytes, match: str) -> None:
    r = _crafted(4096, magic, header)
    with pytest.raises(BlockMapError, match=match):
        swap.build(r)
    assert probe.block_map_for(r).is_all_used


def test_not_swap() -> None:
    r = BytesReader(b"\x00" * (1 * MiB))
    assert not swap.detect(r)
    with pytest.raises(BlockMapError):
        swap.build(r)


@settings(max_examples=150, deadline=None)
@given(
    page=st.sampled_from([4096, 8192, 16384, 65536]),
    pages=st.integers(2, 80),
    data=st.data(),
    order=st.sampled_from(["<", ">"]),
    tail=st.integers(0, 4095),
)
def test_used_pages_match_the_header(page: int, pages: int, data: st.DataObject, order: str,
                                     tail: int) -> None:
    """Property: used = header page + every page past last_page + the odd tail bytes."""
    last = data.draw(st.integers(1, pages - 1))
    r = _crafted(page, b"SWAPSPACE2", struct.pack(order + "III", 1, last, 3), pages)
    r = BytesReader(r.data + b"\x01" * tail)
    bmap = swap.build(r)
    assert bmap.block_size == page
    expect = [(0, page)]
    if last + 1 < pages or tail:
        expect.append(((last + 1) * page, r.size - (last + 1) * page))
    assert bmap.used_ranges(0, r.size) == expect
