"""FAT12/16/32 block map: a cluster is used when its FAT entry is not zero.

Everything before the data area (boot sector, FSInfo, backup boot sector, the FATs,
the FAT12/16 root directory) is used, as are bad and reserved clusters (their entries
are non-zero) and the sectors past the last whole cluster. The data area need not be
cluster-aligned, so the map's unit is the largest power-of-two run of sectors that
divides both the data area's start and the cluster size (often the cluster itself).
A cluster counts as used if *any* FAT copy says so: copies can disagree after a crash
or with mirroring disabled, and a union is never wrong.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from diskvault.blockmap.base import BlockMap, RangeReader
from diskvault.errors import BlockMapError

MAX_FAT12 = 4084  # the Linux kernel's rule: more clusters than this is FAT16
FAT_SLICE = 1 << 22  # FAT entries decoded per step, to bound memory on huge FAT32


@dataclass(frozen=True)
class Geometry:
    bits: int  # 12, 16 or 32
    sector: int
    spc: int  # sectors per cluster
    fat_start: int  # sectors
    fat_sectors: int
    nfats: int
    data_start: int  # first sector of cluster 2
    clusters: int  # number of data clusters (entries 2 .. clusters+1)


def parse_boot(boot: bytes, size: int) -> Geometry:
    """Validate the BPB; raise BlockMapError on anything a FAT driver would reject."""
    if len(boot) < 512:
        raise BlockMapError("FAT: boot sector truncated")
    if boot[510:512] != b"\x55\xaa":
        raise BlockMapError("FAT: no boot signature")
    if boot[0] not in (0xEB, 0xE9):
        raise BlockMapError("FAT: no jump instruction in the boot sector")
    if boot[3:11] in (b"NTFS    ", b"EXFAT   "):
        raise BlockMapError("FAT: this is NTFS/exFAT")
    bps, spc, rsvd, nfats, root_ents, tot16, media, fat16 = struct.unpack_from(
        "<HBHBHHBH", boot, 11
    )
    tot32 = struct.unpack_from("<I", boot, 32)[0]
    if bps not in (512, 1024, 2048, 4096):
        raise BlockMapError(f"FAT: bad bytes per sector {bps}")
    if spc == 0 or spc & (spc - 1):
        raise BlockMapError(f"FAT: bad sectors per cluster {spc}")
    if rsvd == 0 or nfats == 0 or media not in (0xF0, *range(0xF8, 0x100)):
        raise BlockMapError("FAT: bad reserved sectors, FAT count or media byte")
    total = tot16 or tot32
    fat_sectors = fat16 or struct.unpack_from("<I", boot, 36)[0]
    if not total or not fat_sectors:
        raise BlockMapError("FAT: zero sector count or FAT size")
    if total * bps > size:
        raise BlockMapError(f"FAT: filesystem of {total * bps} bytes exceeds the "
                            f"{size}-byte partition")
    root_sectors = (root_ents * 32 + bps - 1) // bps
    data_start = rsvd + nfats * fat_sectors + root_sectors
    if data_start >= total:
        raise BlockMapError("FAT: no data area")
    clusters = (total - data_start) // spc
    if fat16 == 0:
        if root_ents != 0:
            raise BlockMapError("FAT32 with a fixed root directory")
        bits = 32
    else:
        bits = 12 if clusters <= MAX_FAT12 else 16
    if (clusters + 2) * bits > fat_sectors * bps * 8:
        raise BlockMapError(f"FAT{bits}: FAT too small for {clusters} clusters")
    if bits == 32 and clusters > 0x0FFFFFF5:
        raise BlockMapError("FAT32: too many clusters")
    return Geometry(bits, bps, spc, rsvd, fat_sectors, nfats, data_start, clusters)


def detect(reader: RangeReader) -> bool:
    try:
        parse_boot(reader.pread(0, 512), reader.size)
    except BlockMapError:
        return False
    return True


def build(reader: RangeReader) -> BlockMap:
    g = parse_boot(reader.pread(0, 512), reader.size)
    # unit: a power-of-two number of sectors that both the data start and a cluster align to
    unit = math.gcd(g.spc, g.data_start & -g.data_start)
    per_cluster = g.spc // unit
    bmap = BlockMap.empty(reader.size, g.sector * unit, "fat")
    data_block = g.data_start // unit
    bmap.mark_used(0, data_block)
    # past the last whole cluster: used (the FS does not own it, but nothing says it is free)
    tail = data_block + g.clusters * per_cluster
    bmap.mark_used(tail, bmap.nblocks - tail)
    for first in range(0, g.clusters, FAT_SLICE):
        count = min(FAT_SLICE, g.clusters - first)
        used = np.zeros(count, dtype=bool)
        for copy in range(g.nfats):
            used |= _entries_used(reader, g, copy, first + 2, count)
        _or_bits(bmap.bits, data_block + first * per_cluster, np.repeat(used, per_cluster))
    return bmap


def _entries_used(reader: RangeReader, g: Geometry, copy: int, first: int,
                  count: int) -> np.ndarray:
    """Non-zero-ness of FAT entries ``first .. first+count-1`` of one FAT copy."""
    base = (g.fat_start + copy * g.fat_sectors) * g.sector
    if g.bits == 12:
        # entries pair up in 3 bytes; ``first`` is even (2 + a multiple of FAT_SLICE)
        lo, n3 = first // 2 * 3, (count + 1) // 2 * 3
        raw = _read(reader, base + lo, n3)
        t = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.uint16)
        even = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
        odd = (t[:, 1] >> 4) | (t[:, 2] << 4)
        vals = np.stack([even, odd], axis=1).reshape(-1)[:count]
    else:
        width = g.bits // 8
        raw = _read(reader, base + first * width, count * width)
        vals = np.frombuffer(raw, dtype="<u2" if width == 2 else "<u4")
    # FAT32's top four bits are reserved; a non-zero value there is kept, conservatively
    return vals != 0


def _read(reader: RangeReader, offset: int, size: int) -> bytes:
    data = reader.pread(offset, size)
    if len(data) != size:
        raise BlockMapError("FAT: table read past the end of the partition")
    return data


def _or_bits(bits: np.ndarray, first_bit: int, bools: np.ndarray) -> None:
    """OR a bool run into a packed LSB-first bitmap at any bit offset."""
    shift = first_bit % 8
    if shift:
        bools = np.concatenate([np.zeros(shift, dtype=bool), bools])
    packed = np.packbits(bools, bitorder="little")
    start = first_bit // 8
    bits[start : start + len(packed)] |= packed[: len(bits) - start]
