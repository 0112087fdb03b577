"""The jbd2 journal of an ext3/4 filesystem that was not replayed (needs_recovery).

A crash-consistent snapshot of a mounted ext4 has stale on-disk bitmaps: the newest
copies of the bitmap blocks sit in the journal and only reach their home location when
the journal is replayed (at mount or by e2fsck, i.e. after restore). After replay every
bitmap block equals its on-disk copy or one of its logged copies, so OR-ing all of them
gives a superset of what replay produces: no block that replay calls used is ever dropped.

This module only finds those copies: it maps the journal inode's blocks, then walks the
log from its start like jbd2's scan pass (descriptor → tagged data blocks, commit,
revoke). It is deliberately more permissive than jbd2: it keeps uncommitted and revoked
copies too, because an extra copy can only mark more blocks used.
Format: Linux ``include/linux/jbd2.h``; all fields big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from diskvault.blockmap.base import RangeReader
from diskvault.errors import BlockMapError

JBD2_MAGIC = 0xC03B3998
_DESCRIPTOR, _COMMIT, _SB_V1, _SB_V2, _REVOKE = 1, 2, 3, 4, 5
# incompat features: revoke, 64-bit block numbers, async commit, checksum v2 / v3
_REVOKE_F, _64BIT, _ASYNC, _CSUM_V2, _CSUM_V3, _FAST_COMMIT = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
_KNOWN_INCOMPAT = _REVOKE_F | _64BIT | _ASYNC | _CSUM_V2 | _CSUM_V3
# tag flags: data escaped (its magic was zeroed), UUID omitted, last tag of the block
_FLAG_ESCAPE, _FLAG_SAME_UUID, _FLAG_LAST_TAG = 0x1, 0x2, 0x8

_EXTENTS_FL = 0x80000
_EXTENT_MAGIC = 0xF30A


@dataclass
class JournalScan:
    """What the log holds: copies of the wanted blocks, in log order."""

    copies: list[tuple[int, bytes]] = field(default_factory=list)  # (fs block, contents)
    transactions: int = 0  # commit records seen
    logged_blocks: int = 0  # tagged blocks of any kind
    max_target: int = -1  # highest fs block number written by the log
    clean: bool = False  # s_start == 0: nothing to replay


def inode_block_map(reader: RangeReader, bs: int, inode: bytes, fs_blocks: int) -> np.ndarray:
    """Physical block of every logical block of an inode (extents or ext2/3 block map).

    Raises ``BlockMapError`` for a hole or a block outside the filesystem: a journal
    is always fully allocated, so either means the inode is not what we think it is.
    """
    (size_lo,) = struct.unpack_from("<I", inode, 0x4)
    (flags,) = struct.unpack_from("<I", inode, 0x20)
    (size_hi,) = struct.unpack_from("<I", inode, 0x6C)
    nblocks = ((size_hi << 32) | size_lo) // bs
    if nblocks < 2 or nblocks > (1 << 30):
        raise BlockMapError(f"its journal inode has an implausible size ({nblocks} blocks)")
    phys = np.zeros(nblocks, dtype=np.int64)
    i_block = inode[0x28 : 0x28 + 60]
    if flags & _EXTENTS_FL:
        _walk_extents(reader, bs, i_block, phys, depth_left=5)
    else:
        _walk_indirect(reader, bs, i_block, phys)
    if (phys <= 0).any() or (phys >= fs_blocks).any():
        raise BlockMapError("its journal inode has holes or blocks outside the filesystem")
    return phys


def _read_block(reader: RangeReader, bs: int, block: int) -> bytes:
    data = reader.pread(block * bs, bs)
    if len(data) != bs:
        raise BlockMapError(f"journal block {block} lies past the end of the device")
    return data


def _walk_extents(
    reader: RangeReader, bs: int, node: bytes, phys: np.ndarray, depth_left: int
) -> None:
    magic, entries, _max, depth = struct.unpack_from("<HHHH", node, 0)
    if magic != _EXTENT_MAGIC or depth_left <= 0 or 12 + entries * 12 > len(node):
        raise BlockMapError("its journal inode has a damaged extent tree")
    for i in range(entries):
        off = 12 + 12 * i
        if depth == 0:
            lblk, length, hi, lo = struct.unpack_from("<IHHI", node, off)
            length = length - 32768 if length > 32768 else length  # unwritten extent
            end = min(lblk + length, len(phys))
            if lblk < end:
                phys[lblk:end] = ((hi << 32) | lo) + np.arange(end - lblk, dtype=np.int64)
        else:
            _lblk, lo, hi = struct.unpack_from("<IIH", node, off)
            child = _read_block(reader, bs, (hi << 32) | lo)
            _walk_extents(reader, bs, child, phys, depth_left - 1)


def _walk_indirect(reader: RangeReader, bs: int, i_block: bytes, phys: np.ndarray) -> None:
    ptrs = np.frombuffer(i_block, dtype="<u4").astype(np.int64)
    n = min(12, len(phys))
    phys[:n] = ptrs[:n]
    per = bs // 4
    pos = 12
    for level, root in enumerate(ptrs[12:15], start=1):
        if pos >= len(phys):
            return
        span = per**level
        if root:
            _fill_indirect(reader, bs, int(root), level, phys, pos)
        pos += span


def _fill_indirect(
    reader: RangeReader, bs: int, block: int, level: int, phys: np.ndarray, pos: int
) -> None:
    ptrs = np.frombuffer(_read_block(reader, bs, block), dtype="<u4").astype(np.int64)
    if level == 1:
        n = min(len(ptrs), len(phys) - pos)
        if n > 0:
            phys[pos : pos + n] = ptrs[:n]
        return
    span = (bs // 4) ** (level - 1)
    for i, child in enumerate(ptrs):
        start = pos + i * span
        if start >= len(phys):
            return
        if child:
            _fill_indirect(reader, bs, int(child), level - 1, phys, start)


def scan(reader: RangeReader, bs: int, phys: np.ndarray, wanted: np.ndarray) -> JournalScan:
    """Walk the log from its start; return copies of the fs blocks listed in ``wanted``."""
    jsb = _read_block(reader, bs, int(phys[0]))
    magic, btype, _seq = struct.unpack_from(">III", jsb, 0)
    if magic != JBD2_MAGIC or btype not in (_SB_V1, _SB_V2):
        raise BlockMapError("the journal superblock is damaged")
    jbs, maxlen, first, sequence, start = struct.unpack_from(">IIIII", jsb, 0xC)
    incompat = struct.unpack_from(">I", jsb, 0x28)[0] if btype == _SB_V2 else 0
    start_ok = start == 0 or first <= start < maxlen
    if jbs != bs or not 1 <= first < maxlen <= len(phys) or not start_ok:
        raise BlockMapError("the journal superblock has implausible geometry")
    out = JournalScan(clean=start == 0)
    if start == 0:  # jbd2 replays nothing then, fast-commit area included
        return out
    if incompat & _FAST_COMMIT:
        raise BlockMapError("the journal uses fast commits, whose replay is not modelled")
    if incompat & ~_KNOWN_INCOMPAT:
        raise BlockMapError(f"the journal has unknown features (0x{incompat:x})")
    wanted_set = {int(b) for b in wanted}
    pos, seq = start, sequence
    for _step in range(maxlen - first):  # a valid log never holds more blocks than this
        hdr = _read_block(reader, bs, int(phys[pos]))
        magic, btype, hseq = struct.unpack_from(">III", hdr, 0)
        if magic != JBD2_MAGIC or hseq != seq:
            break  # end of the log, exactly where jbd2's scan stops
        if btype == _DESCRIPTOR:
            for target, flags in _tags(hdr, bs, incompat):
                pos = _next(pos, first, maxlen)
                out.logged_blocks += 1
                out.max_target = max(out.max_target, target)
                if target in wanted_set:
                    data = _read_block(reader, bs, int(phys[pos]))
                    if flags & _FLAG_ESCAPE:  # jbd2 zeroed a leading magic; put it back
                        data = struct.pack(">I", JBD2_MAGIC) + data[4:]
                    out.copies.append((target, data))
        elif btype == _COMMIT:
            out.transactions += 1
            seq = (seq + 1) & 0xFFFFFFFF
        elif btype != _REVOKE:
            break  # revoke records only stop replay of older copies: harmless to keep them
        pos = _next(pos, first, maxlen)
    return out


def _next(pos: int, first: int, maxlen: int) -> int:
    pos += 1
    return first if pos >= maxlen else pos


def _tags(block: bytes, bs: int, incompat: int) -> list[tuple[int, int]]:
    """(target block, flags) of every tag of a descriptor block."""
    csum3, csum2, is64 = incompat & _CSUM_V3, incompat & _CSUM_V2, incompat & _64BIT
    # journal_block_tag3_t: blocknr, flags, blocknr_high, checksum (always 16 bytes);
    # journal_block_tag_t: blocknr, checksum16, flags16 [, blocknr_high]
    size = 16 if csum3 else 8 + (4 if is64 else 0) + (2 if csum2 else 0)
    end = bs - (4 if (csum2 or csum3) else 0)  # csum v2/v3 end the block with a tail
    out: list[tuple[int, int]] = []
    off = 12
    while off + size <= end:
        if csum3:
            lo, flags, hi = struct.unpack_from(">III", block, off)
        else:
            lo, _csum, flags = struct.unpack_from(">IHH", block, off)
            hi = struct.unpack_from(">I", block, off + 8)[0] if is64 else 0
        out.append((lo | ((hi << 32) if is64 else 0), flags))
        off += size if flags & _FLAG_SAME_UUID else size + 16
        if flags & _FLAG_LAST_TAG:
            break
    return out
