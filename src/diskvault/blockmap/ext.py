"""Block map of ext2/ext3/ext4: superblock → group descriptors → block bitmaps.

The on-disk block bitmaps are LSB-first like ``BlockMap``, so each group's bitmap is
copied in whole into one buffer that then becomes the map; all bookkeeping is per group
or vectorised, never per block. Static metadata (superblock and descriptor backups,
reserved GDT blocks, bitmaps, inode tables, MMP block, boot area) is always marked used,
even where the bitmap says so too, so a wrong flag or an uninitialised bitmap cannot free
it. Unit of the map: the allocation cluster (= the block, unless bigalloc).

Doubts raise ``BlockMapError``: on a cleanly unmounted filesystem the bitmaps, group
descriptors and superblock must agree exactly. A journal that was not replayed is
handled by OR-ing in every logged bitmap copy (see ``ext_journal``).
"""

from __future__ import annotations

import struct

import numpy as np

from diskvault.blockmap import ext_journal
from diskvault.blockmap.base import BlockMap, RangeReader, packed_len, set_bits
from diskvault.blockmap.ext_layout import (
    BLOCK_UNINIT,
    ERROR_FS,
    FAST_COMMIT,
    FILETYPE,
    GDT_CSUM,
    HAS_JOURNAL,
    JOURNAL_DEV,
    MAGIC,
    META_BG,
    METADATA_CSUM,
    RECOVER,
    SB_OFFSET,
    VALID_FS,
    Super,
    count_in,
    merge_runs,
    metadata_runs,
    parse_super,
    read_blocks_into,
    read_descriptors,
)
from diskvault.errors import BlockMapError

# features an ext2 / ext3 driver understands: beyond them blkid says "ext4"
_EXT3_INCOMPAT = FILETYPE | RECOVER | META_BG
_EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir


def _read_super(reader: RangeReader) -> bytes:
    return reader.pread(SB_OFFSET, 1024)


def detect(reader: RangeReader) -> bool:
    raw = _read_super(reader)
    return len(raw) == 1024 and struct.unpack_from("<H", raw, 0x38)[0] == MAGIC


def fs_type(reader: RangeReader) -> str | None:
    """"ext2", "ext3", "ext4" (blkid's rules), "jbd" for a journal device, else None."""
    if not detect(reader):
        return None
    compat, incompat, ro = struct.unpack_from("<III", _read_super(reader), 0x5C)
    if incompat & JOURNAL_DEV:
        return "jbd"
    if incompat & ~_EXT3_INCOMPAT or ro & ~_EXT3_RO_COMPAT:
        return "ext4"
    return "ext3" if compat & HAS_JOURNAL else "ext2"


def build(reader: RangeReader) -> BlockMap:
    sb = parse_super(_read_super(reader), reader.size)
    if sb.state & ERROR_FS:
        raise BlockMapError("ext filesystem has errors recorded: run e2fsck first")
    recover = bool(sb.incompat & RECOVER)
    if not recover and not sb.state & VALID_FS:
        raise BlockMapError("ext filesystem was not cleanly unmounted (no journal to trust)")
    desc = read_descriptors(reader, sb)
    starts, counts = metadata_runs(sb, desc)
    bs_c = sb.block_size << sb.cluster_bits
    nmap = reader.size // bs_c  # bits of the final map

    # one buffer: first the group rows (row g = clusters of group g), then, shifted by
    # first_data_block bits in place, the map itself — no second copy of a 480 MiB bitmap
    width = sb.clusters_per_group // 8
    buf = np.zeros(max(sb.ngroups * width + 1, packed_len(nmap)), dtype=np.uint8)
    rows = buf[: sb.ngroups * width].reshape(sb.ngroups, width)

    # BLOCK_UNINIT is only trusted when descriptors carry checksums (as the kernel does)
    csum = bool(sb.ro_compat & (GDT_CSUM | METADATA_CSUM))
    uninit = (desc["flags"] & BLOCK_UNINIT) != 0 if csum else np.zeros(sb.ngroups, bool)
    read = np.flatnonzero(~uninit)
    bb = desc["block_bitmap"]
    if len(np.unique(bb)) != sb.ngroups:
        raise BlockMapError("two ext groups share one block bitmap")
    read_blocks_into(reader, bb[read], sb.block_size, rows, read)
    in_group = sb.clusters_in_groups()
    _clip_last_row(rows, int(in_group[-1]))

    ms, mc = _to_clusters(sb, starts, counts)
    if recover:
        note = _or_in_journal(reader, sb, desc, rows)
    else:
        _check_counts(sb, desc, rows, read, uninit, in_group, ms, mc)
        note = ""
    if sb.first_data_block:
        _shift_up_one_bit(buf, sb.ngroups * width)
    bmap = BlockMap(fs_type(reader) or "ext4", reader.size, bs_c, buf[: packed_len(nmap)], note)
    _mark_static(bmap, sb, ms, mc)
    return bmap


def _clip_last_row(rows: np.ndarray, valid: int) -> None:
    """Clear the padding bits of the short last group (mke2fs sets them to 1)."""
    if valid < rows.shape[1] * 8:
        tail = np.unpackbits(rows[-1], bitorder="little")
        tail[valid:] = 0
        rows[-1] = np.packbits(tail, bitorder="little")


def _to_clusters(sb: Super, s: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cs = s >> sb.cluster_bits
    ce = ((s + c - 1) >> sb.cluster_bits) + 1
    return merge_runs(cs, ce - cs)


def _row_popcounts(rows: np.ndarray, which: np.ndarray) -> np.ndarray:
    out = np.empty(len(which), dtype=np.int64)
    for i in range(0, len(which), 4096):  # chunks: never a copy of every row at once
        part = rows[which[i : i + 4096]]
        if hasattr(np, "bitwise_count"):
            out[i : i + 4096] = np.bitwise_count(part).sum(axis=1, dtype=np.int64)
        else:
            out[i : i + 4096] = np.unpackbits(part, axis=1).sum(axis=1, dtype=np.int64)
    return out


def _check_counts(
    sb: Super, desc: dict[str, np.ndarray], rows: np.ndarray, read: np.ndarray,
    uninit: np.ndarray, in_group: np.ndarray, ms: np.ndarray, mc: np.ndarray,
) -> None:
    """On a cleanly unmounted fs, bitmaps, descriptors and superblock agree exactly."""
    free = desc["free"]
    if len(read):
        got = in_group[read] - _row_popcounts(rows, read)
        bad = np.flatnonzero(got != free[read])
        if len(bad):
            g = int(read[bad[0]])
            raise BlockMapError(
                f"ext group {g}: bitmap shows {int(got[bad[0]])} free clusters, descriptor "
                f"says {int(free[g])}: run e2fsck"
            )
    un = np.flatnonzero(uninit)
    if len(un):  # an uninitialised group holds nothing but its own metadata
        lo = (sb.first_data_block + un * sb.blocks_per_group) >> sb.cluster_bits
        meta = count_in(ms, mc, lo, lo + in_group[un])
        bad = np.flatnonzero(in_group[un] - meta != free[un])
        if len(bad):
            raise BlockMapError(
                f"ext group {int(un[bad[0]])} is flagged BLOCK_UNINIT but its free count "
                "does not match its metadata: run e2fsck"
            )
    total = int(free.sum()) << sb.cluster_bits  # the superblock counts blocks
    if total != sb.free_blocks:
        raise BlockMapError(
            f"ext free blocks: groups add up to {total}, superblock says {sb.free_blocks}"
        )


def _or_in_journal(
    reader: RangeReader, sb: Super, desc: dict[str, np.ndarray], rows: np.ndarray
) -> str:
    """needs_recovery: OR every logged copy of a block bitmap into its group's row."""
    if sb.journal_inum == 0 or sb.journal_dev != 0:
        raise BlockMapError(
            "ext needs journal recovery and its journal is on another device: all blocks read"
        )
    ino = sb.journal_inum - 1
    group, index = divmod(ino, sb.inodes_per_group)
    if group >= sb.ngroups:
        raise BlockMapError("ext journal inode number is out of range")
    inode = reader.pread(int(desc["inode_table"][group]) * sb.block_size
                         + index * sb.inode_size, 128)
    if len(inode) != 128:
        raise BlockMapError("ext journal inode lies past the end of the device")
    sb_block = SB_OFFSET // sb.block_size  # 1 on 1 KiB blocks, else 0
    bb = desc["block_bitmap"]
    try:
        phys = ext_journal.inode_block_map(reader, sb.block_size, inode, sb.blocks_count)
        scan = ext_journal.scan(reader, sb.block_size, phys, np.append(bb, sb_block))
    except BlockMapError as e:
        raise BlockMapError(f"ext needs journal recovery but {e}: all blocks read") from e
    if not scan.clean and sb.compat & FAST_COMMIT:
        # fast-commit replay rebuilds allocations from logical records, not bitmap copies
        raise BlockMapError("ext journal with fast commits needs recovery: all blocks read")
    if scan.max_target >= sb.blocks_count:
        raise BlockMapError("ext journal writes past the end of the filesystem (resize?)")
    group_of = {int(b): i for i, b in enumerate(bb.tolist())}
    copies = 0
    for target, data in scan.copies:
        if target in group_of:
            row = rows[group_of[target]]
            row |= np.frombuffer(data, dtype=np.uint8)[: len(row)]
            copies += 1
        else:  # a logged superblock: replay must not change the geometry under us
            logged = parse_super(data[SB_OFFSET % sb.block_size :][:1024], reader.size)
            if logged.blocks_count != sb.blocks_count:
                raise BlockMapError("ext journal resizes the filesystem: all blocks read")
    if scan.clean:
        return "ext needs_recovery is set but the journal is empty: on-disk bitmaps used"
    return (
        f"ext journal not replayed: {copies} block-bitmap copies from "
        f"{scan.transactions} logged transactions OR-ed into the on-disk bitmaps"
    )


def _shift_up_one_bit(buf: np.ndarray, n: int, step: int = 1 << 22) -> None:
    """Move the bits of ``buf[:n]`` up by one (into ``buf[n]``), in place, in chunks.

    With 1 KiB blocks group 0 starts at block 1, so bit i of the rows is block i + 1.
    Chunks run from the end so every chunk still sees its lower neighbour unshifted.
    """
    buf[n] |= buf[n - 1] >> 7
    for end in range(n, 0, -step):
        start = max(0, end - step)
        moved = buf[start:end] << 1
        lo = max(start, 1)  # byte 0 has no lower neighbour
        moved[lo - start :] |= buf[lo - 1 : end - 1] >> 7
        buf[start:end] = moved


def _mark_static(bmap: BlockMap, sb: Super, ms: np.ndarray, mc: np.ndarray) -> None:
    """Static metadata, the boot area, and anything past the filesystem: used."""
    fs_clusters = min(sb.clusters, bmap.nblocks)
    set_bits(bmap.bits, fs_clusters, bmap.nblocks - fs_clusters, True)  # not proven free
    set_bits(bmap.bits, bmap.nblocks, len(bmap.bits) * 8 - bmap.nblocks, False)
    for s, c in zip(ms.tolist(), mc.tolist(), strict=True):
        bmap.mark_used(s, c)
    bmap.mark_used_bytes(0, 2048)  # boot sector area and primary superblock
    if sb.mmp_block:
        bmap.mark_used(sb.mmp_block >> sb.cluster_bits, 1)
