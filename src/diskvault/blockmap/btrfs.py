"""btrfs block map: every extent of the extent tree, mapped through the chunk tree.

Start all-free and mark: the first MiB (boot area, primary superblock), every superblock
mirror inside the device, every tree block walked to get here, and each data/metadata
extent at *every* stripe of its chunk (both copies of DUP). What no committed extent
claims is free. The extents must add up to the superblock's bytes_used.

Only the committed trees are read; CoW means a crash-consistent copy of a mounted
filesystem still holds them intact. A log tree (fsync'd but uncommitted data) is not
walked, so a non-zero log root is refused, as are multi-device filesystems, RAID
profiles and feature bits this parser does not know.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from diskvault.blockmap.base import BlockMap, RangeReader
from diskvault.errors import BlockMapError

SUPER_OFFSET, SUPER_SIZE = 0x10000, 4096
MIRRORS = (0x10000, 64 << 20, 256 << 30, 1 << 50)
MAGIC = b"_BHRfS_M"
HEADER, ITEM, KEY_PTR = 0x65, 25, 33
MAX_LEVEL = 8
CHUNK_ITEM, ROOT_ITEM, EXTENT_ITEM, METADATA_ITEM = 228, 132, 168, 169
EXTENT_TREE_OBJECTID = 2
BG_PROFILE_DUP = 1 << 5
BG_PROFILES = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
# mixed backref, default subvol, mixed groups, lzo, zstd, big metadata, extended iref,
# skinny metadata, no holes, metadata uuid; not RAID56, zoned, extent tree v2, ...
INCOMPAT_OK = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x200 | 0x400
INCOMPAT_METADATA_UUID = 0x400
SUPER_FLAGS_BAD = (1 << 2) | (1 << 32) | (1 << 33) | (1 << 34) | (1 << 35) | (1 << 36)

ITEM_DTYPE = np.dtype([("objectid", "<u8"), ("type", "u1"), ("offset", "<u8"),
                       ("data_off", "<u4"), ("data_size", "<u4")])


@dataclass(frozen=True)
class Chunk:
    logical: int
    length: int
    stripes: tuple[int, ...]  # physical offsets, one per copy


@dataclass(frozen=True)
class Super:
    sector: int
    node: int
    device_bytes: int
    bytes_used: int
    root: int
    root_level: int
    chunk_root: int
    chunk_level: int
    devid: int
    meta_fsid: bytes  # what tree block headers carry


def detect(reader: RangeReader) -> bool:
    return reader.pread(SUPER_OFFSET + 0x40, 8) == MAGIC


def parse_super(sb: bytes, size: int) -> Super:
    if len(sb) < SUPER_SIZE or sb[0x40:0x48] != MAGIC:
        raise BlockMapError("not a btrfs superblock")
    flags = struct.unpack_from("<Q", sb, 0x38)[0]
    root, chunk_root, log_root = struct.unpack_from("<QQQ", sb, 0x50)
    bytes_used, _rootdir, ndev = struct.unpack_from("<QQQ", sb, 0x78)
    sector, node = struct.unpack_from("<II", sb, 0x90)
    incompat = struct.unpack_from("<Q", sb, 0xBC)[0]
    root_level, chunk_level = sb[0xC6], sb[0xC7]
    devid, dev_bytes = struct.unpack_from("<QQ", sb, 0xC9)
    if log_root:
        raise BlockMapError("btrfs has a log tree (fsync'd, uncommitted changes): reading all")
    if ndev != 1:
        raise BlockMapError(f"btrfs spans {ndev} devices: not supported, reading all")
    if flags & SUPER_FLAGS_BAD:
        raise BlockMapError(f"btrfs superblock flags {flags:#x} (error, seed or metadump)")
    if incompat & ~INCOMPAT_OK:
        raise BlockMapError(f"btrfs incompat features {incompat:#x} not supported")
    if sector < 4096 or sector & (sector - 1) or node < sector or node > 65536 \
            or node & (node - 1):
        raise BlockMapError("btrfs: bad sector or node size")
    if root_level >= MAX_LEVEL or chunk_level >= MAX_LEVEL:
        raise BlockMapError("btrfs: bad tree level")
    if dev_bytes > size:
        raise BlockMapError(f"btrfs: device of {dev_bytes} bytes exceeds the "
                            f"{size}-byte partition")
    fsid = sb[0x23B:0x24B] if incompat & INCOMPAT_METADATA_UUID else sb[0x20:0x30]
    return Super(sector, node, dev_bytes, bytes_used, root, root_level, chunk_root,
                 chunk_level, devid, fsid)


def build(reader: RangeReader) -> BlockMap:
    fs = Filesystem(reader)
    bmap = BlockMap.empty(reader.size, fs.sb.sector, "btrfs")
    bmap.mark_used_bytes(0, 1 << 20)
    for off in MIRRORS:
        if off + SUPER_SIZE <= fs.sb.device_bytes:
            bmap.mark_used_bytes(off, SUPER_SIZE)
    # past the device's end as btrfs knows it: used (nothing says it is free)
    bmap.mark_used_bytes(fs.sb.device_bytes, reader.size - fs.sb.device_bytes)
    total, run_start, run_end, chunk_end = 0, 0, 0, 0
    for start, length in fs.extents():
        if start < run_end:
            raise BlockMapError(f"btrfs: extent {start} overlaps the one before")
        total += length
        if start == run_end and start + length <= chunk_end:
            run_end += length  # contiguous in the same chunk: one mark for the whole run
            continue
        if run_end:
            fs.mark(bmap, run_start, run_end - run_start)
        chunk = fs.chunk_of(start)
        run_start, run_end, chunk_end = start, start + length, chunk.logical + chunk.length
    if run_end:
        fs.mark(bmap, run_start, run_end - run_start)
    if total != fs.sb.bytes_used:
        raise BlockMapError(f"btrfs extents add up to {total} bytes, the superblock "
                            f"says {fs.sb.bytes_used}")
    for logical in fs.walked:  # tree blocks read on the way: used whatever the tree says
        fs.mark(bmap, logical, fs.sb.node)
    return bmap


class Filesystem:
    def __init__(self, reader: RangeReader) -> None:
        self.r = reader
        raw = reader.pread(SUPER_OFFSET, SUPER_SIZE)
        self.sb = parse_super(raw, reader.size)
        self.walked: list[int] = []
        self.chunks: list[Chunk] = []
        self._starts: list[int] = []
        for chunk in self._sys_chunks(raw):
            self._add_chunk(chunk)
        for key, data in self._leaf_items(self.sb.chunk_root, self.sb.chunk_level):
            if key[1] == CHUNK_ITEM:
                chunk = self._parse_chunk(key[2], data)
                existing = self._find(chunk.logical)
                if existing is None:
                    self._add_chunk(chunk)
                elif existing != chunk:
                    raise BlockMapError("btrfs: chunk tree and superblock disagree")

    # --- chunks --------------------------------------------------------------

    def _sys_chunks(self, sb: bytes) -> Iterator[Chunk]:
        size = struct.unpack_from("<I", sb, 0xA0)[0]
        if size > 2048:
            raise BlockMapError("btrfs: bad system chunk array size")
        arr, pos = sb[0x32B : 0x32B + size], 0
        while pos < size:
            if pos + 17 + 48 > size:
                raise BlockMapError("btrfs: truncated system chunk array")
            _obj, ktype, logical = struct.unpack_from("<QBQ", arr, pos)
            nstripes = struct.unpack_from("<H", arr, pos + 17 + 44)[0]
            end = pos + 17 + 48 + 32 * nstripes
            if ktype != CHUNK_ITEM or end > size:
                raise BlockMapError("btrfs: bad system chunk array entry")
            yield self._parse_chunk(logical, arr[pos + 17 : end])
            pos = end

    def _parse_chunk(self, logical: int, data: bytes) -> Chunk:
        if len(data) < 48:
            raise BlockMapError("btrfs: short chunk item")
        length, _owner, _stripe_len, ctype = struct.unpack_from("<QQQQ", data, 0)
        nstripes = struct.unpack_from("<H", data, 44)[0]
        if len(data) < 48 + 32 * nstripes or nstripes == 0:
            raise BlockMapError("btrfs: bad chunk item")
        profile = ctype & BG_PROFILES
        if profile not in (0, BG_PROFILE_DUP) or nstripes != (2 if profile else 1):
            raise BlockMapError(f"btrfs chunk profile {ctype:#x} with {nstripes} stripes: "
                                "only single and DUP are supported")
        stripes = []
        for i in range(nstripes):
            devid, phys = struct.unpack_from("<QQ", data, 48 + 32 * i)
            if devid != self.sb.devid or phys + length > self.sb.device_bytes:
                raise BlockMapError("btrfs: chunk stripe outside the device")
            stripes.append(phys)
        return Chunk(logical, length, tuple(stripes))

    def _add_chunk(self, chunk: Chunk) -> None:
        i = bisect.bisect_left(self._starts, chunk.logical)
        prev_end = self.chunks[i - 1].logical + self.chunks[i - 1].length if i else 0
        nxt = self._starts[i] if i < len(self._starts) else None
        if chunk.logical < prev_end or (nxt is not None and chunk.logical + chunk.length > nxt):
            raise BlockMapError("btrfs: overlapping chunks")
        self.chunks.insert(i, chunk)
        self._starts.insert(i, chunk.logical)

    def _find(self, logical: int) -> Chunk | None:
        i = bisect.bisect_right(self._starts, logical) - 1
        if i >= 0 and logical < self.chunks[i].logical + self.chunks[i].length:
            return self.chunks[i]
        return None

    def chunk_of(self, logical: int, length: int = 1) -> Chunk:
        chunk = self._find(logical)
        if chunk is None or logical + length > chunk.logical + chunk.length:
            raise BlockMapError(f"btrfs: logical range {logical}+{length} is in no chunk")
        return chunk

    def physical(self, logical: int, length: int) -> tuple[int, ...]:
        chunk = self.chunk_of(logical, length)
        return tuple(p + logical - chunk.logical for p in chunk.stripes)

    def mark(self, bmap: BlockMap, logical: int, length: int) -> None:
        for phys in self.physical(logical, length):
            bmap.mark_used_bytes(phys, length)

    # --- trees ---------------------------------------------------------------

    def _node(self, logical: int, level: int) -> bytes:
        phys = self.physical(logical, self.sb.node)[0]
        blk = self.r.pread(phys, self.sb.node)
        if len(blk) != self.sb.node:
            raise BlockMapError("btrfs: tree block past the end of the partition")
        bytenr = struct.unpack_from("<Q", blk, 0x30)[0]
        if bytenr != logical or blk[0x20:0x30] != self.sb.meta_fsid or blk[0x64] != level:
            raise BlockMapError(f"btrfs: tree block {logical} is stale or damaged")
        self.walked.append(logical)
        return blk

    def _leaf_items(self, root: int, level: int) -> Iterator[tuple[tuple[int, int, int], bytes]]:
        """(key, item data) of every leaf item of a tree, in key order."""
        for blk in self._leaves(root, level):
            nritems = struct.unpack_from("<I", blk, 0x60)[0]
            for i in range(nritems):
                obj, ktype, off, doff, dsize = struct.unpack_from("<QBQII", blk,
                                                                  HEADER + i * ITEM)
                if HEADER + doff + dsize > len(blk):
                    raise BlockMapError("btrfs: leaf item data out of bounds")
                yield (obj, ktype, off), blk[HEADER + doff : HEADER + doff + dsize]

    def _leaves(self, root: int, level: int) -> Iterator[bytes]:
        stack = [(root, level)]
        budget = self.sb.device_bytes // self.sb.node  # against loops in a damaged tree
        while stack:
            logical, lvl = stack.pop()
            budget -= 1
            if budget < 0:
                raise BlockMapError("btrfs: tree walk does not end")
            blk = self._node(logical, lvl)
            nritems = struct.unpack_from("<I", blk, 0x60)[0]
            per = ITEM if lvl == 0 else KEY_PTR
            if HEADER + nritems * per > len(blk):
                raise BlockMapError("btrfs: tree block item count out of bounds")
            if lvl == 0:
                yield blk
                continue
            ptrs = [struct.unpack_from("<Q", blk, HEADER + i * KEY_PTR + 17)[0]
                    for i in range(nritems)]
            stack.extend((p, lvl - 1) for p in reversed(ptrs))

    def extents(self) -> Iterator[tuple[int, int]]:
        """(logical start, length) of every data extent and tree block in use."""
        extent_root = None
        for key, data in self._leaf_items(self.sb.root, self.sb.root_level):
            if key[:2] == (EXTENT_TREE_OBJECTID, ROOT_ITEM) and len(data) >= 239:
                extent_root = (struct.unpack_from("<Q", data, 176)[0], data[238])
        if extent_root is None:
            raise BlockMapError("btrfs: no extent tree in the root tree")
        for blk in self._leaves(*extent_root):
            nritems = struct.unpack_from("<I", blk, 0x60)[0]
            items = np.frombuffer(blk, dtype=ITEM_DTYPE, count=nritems, offset=HEADER)
            keep = items[np.isin(items["type"], (EXTENT_ITEM, METADATA_ITEM))]
            # EXTENT_ITEM keys carry the length; METADATA_ITEM keys the level (a tree block)
            lengths = np.where(keep["type"] == EXTENT_ITEM, keep["offset"], self.sb.node)
            yield from zip(keep["objectid"].tolist(), lengths.tolist(), strict=True)
