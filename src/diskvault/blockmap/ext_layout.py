"""ext2/3/4 on-disk layout: superblock, group descriptors, where the static metadata is.

Everything here is per group and vectorised with numpy (a 16 TiB ext4 has 131,072
groups; a Python loop per block would not do). Formats: Linux ``fs/ext4/ext4.h`` and the
kernel's ext4 "Data Structures" documentation; backup placement follows both the kernel
(``ext4_num_base_meta_blocks``) and e2fsprogs (``ext2fs_super_and_bgd_loc2``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from diskvault.blockmap.base import RangeReader
from diskvault.errors import BlockMapError

SB_OFFSET, MAGIC = 1024, 0xEF53
VALID_FS, ERROR_FS = 0x1, 0x2
BLOCK_UNINIT = 0x2  # bg_flags
# compat
HAS_JOURNAL, EXCLUDE_BITMAP, SPARSE_SUPER2, FAST_COMMIT = 0x4, 0x100, 0x200, 0x400
# incompat
FILETYPE, RECOVER, JOURNAL_DEV, META_BG = 0x2, 0x4, 0x8, 0x10
EXTENTS, BIT64, MMP, FLEX_BG = 0x40, 0x80, 0x100, 0x200
_KNOWN_INCOMPAT = (
    FILETYPE | RECOVER | META_BG | EXTENTS | BIT64 | MMP | FLEX_BG
    | 0x400 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000
)  # + ea_inode, dirdata, csum_seed, largedir, inline_data, encrypt, casefold; never
# compression (0x1: blocks would not mean what the bitmaps say)
# ro_compat
SPARSE_SUPER, LARGE_FILE, BTREE_DIR, GDT_CSUM = 0x1, 0x2, 0x4, 0x10
HAS_SNAPSHOT, BIGALLOC, METADATA_CSUM = 0x80, 0x200, 0x400
_KNOWN_RO_COMPAT = 0x1FFFF & ~HAS_SNAPSHOT  # next3 snapshots (exclude bitmaps): refused


@dataclass(frozen=True)
class Super:
    """The superblock fields the block map needs, validated."""

    block_size: int
    cluster_bits: int  # log2(blocks per cluster); 0 without bigalloc
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    clusters_per_group: int
    inodes_per_group: int
    inode_size: int
    ngroups: int
    desc_size: int
    compat: int
    incompat: int
    ro_compat: int
    reserved_gdt: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    free_blocks: int
    state: int
    journal_inum: int
    journal_dev: int
    mmp_block: int

    @property
    def desc_per_block(self) -> int:
        return self.block_size // self.desc_size

    @property
    def gdt_blocks(self) -> int:
        return -(-self.ngroups // self.desc_per_block)

    @property
    def clusters(self) -> int:
        return -(-self.blocks_count >> self.cluster_bits)

    def group_block(self, groups: np.ndarray) -> np.ndarray:
        """First block of each group; group 0 of a 1 KiB fs with bigalloc starts at 1
        (block 0 is the boot block), as in e2fsprogs' ext2fs_super_and_bgd_loc2."""
        first = self.first_data_block + groups * self.blocks_per_group
        if self.block_size == 1024:
            first = np.where(first == 0, 1, first)
        return first

    def clusters_in_groups(self) -> np.ndarray:
        """Clusters each group's bitmap covers (the last group is short)."""
        g = np.arange(self.ngroups, dtype=np.int64)
        left = self.blocks_count - self.first_data_block - g * self.blocks_per_group
        return np.minimum(self.clusters_per_group, -(-left >> self.cluster_bits))


def parse_super(raw: bytes, device_size: int) -> Super:
    """Validate and decode the 1 KiB primary superblock; ``BlockMapError`` on any doubt."""
    if len(raw) < 1024 or struct.unpack_from("<H", raw, 0x38)[0] != MAGIC:
        raise BlockMapError("no ext2/3/4 superblock (bad magic)")

    def u32(off: int) -> int:
        return struct.unpack_from("<I", raw, off)[0]

    def u16(off: int) -> int:
        return struct.unpack_from("<H", raw, off)[0]

    log_bs, log_cs = u32(0x18), u32(0x1C)
    compat, incompat, ro_compat = u32(0x5C), u32(0x60), u32(0x64)
    if incompat & JOURNAL_DEV:
        raise BlockMapError("ext3/4 external journal device: its log is not mapped")
    if incompat & ~_KNOWN_INCOMPAT or ro_compat & ~_KNOWN_RO_COMPAT:
        raise BlockMapError(
            f"ext4 has features this parser does not know (incompat 0x{incompat:x}, "
            f"ro_compat 0x{ro_compat:x})"
        )
    if log_bs > 6:
        raise BlockMapError(f"ext block size 2^{10 + log_bs} is implausible")
    bs = 1024 << log_bs
    big = bool(ro_compat & BIGALLOC)
    cbits = log_cs - log_bs if big else 0
    if not 0 <= cbits <= 16:
        raise BlockMapError("ext cluster size is smaller than the block size")
    is64 = bool(incompat & BIT64)
    blocks = u32(0x4) | ((u32(0x150) << 32) if is64 else 0)
    fdb, bpg, cpg, ipg = u32(0x14), u32(0x20), u32(0x24), u32(0x28)
    cpg = cpg if big else bpg
    inode_size = u16(0x58) if u32(0x4C) >= 1 else 128  # revision 0: fixed 128
    desc_size = u16(0xFE) if is64 else 32
    ngroups = -(-(blocks - fdb) // bpg) if bpg and blocks > fdb else 0
    problems = [
        (fdb != (1 if bs == 1024 and not big else 0), f"first data block {fdb} is wrong"),
        (bpg == 0 or cpg == 0 or cpg % 8 or cpg > 8 * bs, "implausible blocks per group"),
        (big and bpg != cpg << cbits, "bigalloc blocks/clusters per group disagree"),
        (ipg == 0 or ipg > 8 * bs, "implausible inodes per group"),
        (ngroups == 0, "no block groups"),
        (u32(0x0) != ngroups * ipg, "inode count does not match the group count"),
        (inode_size < 128 or inode_size > bs or inode_size & (inode_size - 1), "inode size"),
        (desc_size < 32 or desc_size > bs or desc_size & (desc_size - 1)
         or (is64 and desc_size < 64), "group descriptor size"),
        (u16(0xCE) > bs // 4, "too many reserved GDT blocks"),
        (incompat & RECOVER and not compat & HAS_JOURNAL, "needs_recovery without journal"),
    ]
    for bad, what in problems:
        if bad:
            raise BlockMapError(f"ext superblock is inconsistent: {what}")
    if blocks * bs > device_size:
        raise BlockMapError(
            f"ext filesystem ({blocks * bs} bytes) is larger than its device "
            f"({device_size} bytes): truncated image?"
        )
    sb = Super(
        block_size=bs, cluster_bits=cbits, blocks_count=blocks, first_data_block=fdb,
        blocks_per_group=bpg, clusters_per_group=cpg, inodes_per_group=ipg,
        inode_size=inode_size, ngroups=ngroups, desc_size=desc_size, compat=compat,
        incompat=incompat, ro_compat=ro_compat, reserved_gdt=u16(0xCE),
        first_meta_bg=u32(0x104), backup_bgs=(u32(0x24C), u32(0x250)),
        free_blocks=u32(0xC) | ((u32(0x158) << 32) if is64 else 0),
        state=u16(0x3A), journal_inum=u32(0xE0), journal_dev=u32(0xE4),
        mmp_block=struct.unpack_from("<Q", raw, 0x168)[0] if incompat & MMP else 0,
    )
    if incompat & META_BG and sb.first_meta_bg > sb.gdt_blocks:
        raise BlockMapError("ext superblock is inconsistent: first_meta_bg past the GDT")
    return sb


def has_super(sb: Super, groups: np.ndarray) -> np.ndarray:
    """Which groups carry a superblock backup (sparse_super / sparse_super2 rules)."""
    if sb.compat & SPARSE_SUPER2:
        return (groups == 0) | (groups == sb.backup_bgs[0]) | (groups == sb.backup_bgs[1])
    if not sb.ro_compat & SPARSE_SUPER:
        return np.ones(len(groups), dtype=bool)
    powers = {0}  # group 0, and 1 = 3^0, 3, 5, 7, 9, 25, 27, 49, ...
    for base in (3, 5, 7):
        p = 1
        while p < sb.ngroups:
            powers.add(p)
            p *= base
    return np.isin(groups, np.fromiter(powers, dtype=np.int64))


def _descriptor_blocks(sb: Super) -> np.ndarray:
    """Block number of each group-descriptor block of the primary table."""
    nr = np.arange(sb.gdt_blocks, dtype=np.int64)
    primary = sb.group_block(np.zeros(1, dtype=np.int64))[0] + 1 + nr
    if not sb.incompat & META_BG:
        return primary
    first_group = nr * sb.desc_per_block  # meta_bg: descriptor block in its first group
    meta = sb.group_block(first_group) + has_super(sb, first_group)
    return np.where(nr < sb.first_meta_bg, primary, meta)


def read_descriptors(reader: RangeReader, sb: Super) -> dict[str, np.ndarray]:
    """Group descriptors as int64 columns (block/inode bitmap, inode table, free, flags)."""
    locs = _descriptor_blocks(sb)
    if (locs >= sb.blocks_count).any():
        raise BlockMapError("ext group descriptors lie outside the filesystem")
    raw = np.empty((len(locs), sb.block_size), dtype=np.uint8)
    read_blocks_into(reader, locs, sb.block_size, raw, np.arange(len(locs)))
    d = raw[:, : sb.desc_per_block * sb.desc_size].reshape(-1, sb.desc_size)[: sb.ngroups]
    hi = bool(sb.incompat & BIT64) and sb.desc_size >= 64

    def col(lo: int, hi_off: int, width: int) -> np.ndarray:
        kind = "<u4" if width == 4 else "<u2"
        val = d[:, lo : lo + width].copy().view(kind)[:, 0].astype(np.int64)
        if hi and hi_off:
            upper = d[:, hi_off : hi_off + width].copy().view(kind)[:, 0].astype(np.int64)
            val |= upper << (8 * width)
        return val

    return {
        "block_bitmap": col(0x0, 0x20, 4),
        "inode_bitmap": col(0x4, 0x24, 4),
        "inode_table": col(0x8, 0x28, 4),
        "free": col(0xC, 0x2C, 2),  # free clusters
        "flags": col(0x12, 0, 2),
        "exclude_bitmap": col(0x14, 0x34, 4),
    }


def read_blocks_into(
    reader: RangeReader, blocks: np.ndarray, bs: int, dest: np.ndarray, rows: np.ndarray
) -> None:
    """``dest[rows[i]] = block blocks[i]`` (its first ``dest.shape[1]`` bytes).

    Blocks are sorted so that adjacent ones (flex_bg packs bitmaps together) come in one
    pread of at most 8 MiB; no copy of all blocks is ever held at once.
    """
    if not len(blocks):
        return
    order = np.argsort(blocks, kind="stable")
    srt = blocks[order]
    breaks = np.flatnonzero(np.diff(srt) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [len(srt)])).tolist()
    cap = max(1, (8 << 20) // bs)
    width = dest.shape[1]
    for a, z in zip(starts, ends, strict=True):
        for p in range(a, z, cap):
            q = min(z, p + cap)
            first = int(srt[p])
            data = reader.pread(first * bs, (q - p) * bs)
            if len(data) != (q - p) * bs:
                raise BlockMapError(f"ext metadata block {first} lies past the end of the device")
            chunk = np.frombuffer(data, dtype=np.uint8).reshape(q - p, bs)
            dest[rows[order[p:q]]] = chunk[:, :width]


def metadata_runs(sb: Super, desc: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) in blocks of all static metadata; raises if any of it overlaps."""
    g = np.arange(sb.ngroups, dtype=np.int64)
    first = sb.group_block(g)
    has_sb = has_super(sb, g).astype(np.int64)
    meta_bg = bool(sb.incompat & META_BG)
    old_desc = sb.first_meta_bg if meta_bg else sb.gdt_blocks
    classic = g < sb.first_meta_bg * sb.desc_per_block if meta_bg else np.ones_like(g, bool)
    # classic layout: superblock + whole GDT + reserved GDT (the union of the kernel's and
    # e2fsprogs' rules, which differ on reserved GDT under meta_bg); meta_bg: a descriptor
    # block in the first, second and last group of each meta group
    pos = g % sb.desc_per_block
    meta_desc = ~classic & ((pos == 0) | (pos == 1) | (pos == sb.desc_per_block - 1))
    base_len = has_sb * (1 + np.where(classic, old_desc + sb.reserved_gdt, 0)) + meta_desc
    itb = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
    starts = [first, desc["block_bitmap"], desc["inode_bitmap"], desc["inode_table"]]
    counts = [base_len, np.ones_like(g), np.ones_like(g), np.full_like(g, itb)]
    if sb.compat & EXCLUDE_BITMAP:
        ex = desc["exclude_bitmap"][desc["exclude_bitmap"] != 0]
        starts.append(ex)
        counts.append(np.ones_like(ex))
    s, c = np.concatenate(starts), np.concatenate(counts)
    s, c = s[c > 0], c[c > 0]
    if (s < sb.first_data_block).any() or (s + c > sb.blocks_count).any():
        raise BlockMapError("ext bitmaps or inode tables lie outside the filesystem")
    if not sb.incompat & FLEX_BG:  # without flex_bg, each group keeps its own tables
        for key, n in (("block_bitmap", 1), ("inode_bitmap", 1), ("inode_table", itb)):
            rel = desc[key] - first
            if ((rel < 0) | (rel + n > sb.blocks_per_group)).any():
                raise BlockMapError(f"ext {key.replace('_', ' ')} outside its group (no flex_bg)")
    _, union = merge_runs(s, c)
    if int(union.sum()) != int(c.sum()):
        raise BlockMapError("ext metadata areas overlap (damaged group descriptors)")
    return s, c


def merge_runs(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted union of runs, touching or overlapping runs joined."""
    if not len(starts):
        return starts, counts
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], starts[order] + counts[order]
    reach = np.maximum.accumulate(e)
    new = np.concatenate(([True], s[1:] > reach[:-1]))
    idx = np.flatnonzero(new)
    ends = np.maximum.reduceat(e, idx)
    return s[idx], ends - s[idx]


def count_in(s: np.ndarray, c: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """How many units of the merged runs ``(s, c)`` fall inside each window [lo, hi)."""
    if not len(s):
        return np.zeros(len(lo), dtype=np.int64)
    before = np.concatenate(([0], np.cumsum(c)))

    def upto(x: np.ndarray) -> np.ndarray:  # units of the runs below x
        i = np.searchsorted(s, x, side="right") - 1
        j = np.maximum(i, 0)
        inside = np.clip(x - s[j], 0, c[j])
        return np.where(i >= 0, before[j] + inside, 0)

    return upto(hi) - upto(lo)
