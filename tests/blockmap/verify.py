"""The proof method of BLOCKMAPS.md: restore only the used ranges, then fsck and compare."""

from __future__ import annotations

import os

from diskvault.blockmap.base import BlockMap


def restore_used_only(src: str, bmap: BlockMap, dst: str, src_offset: int = 0) -> int:
    """Copy the map's used ranges of ``src`` into a new sparse file ``dst`` (zeros elsewhere).

    Returns the number of bytes copied.
    """
    copied = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(bmap.size)
        for off, length in bmap.used_ranges(0, bmap.size):
            fi.seek(src_offset + off)
            fo.seek(off)
            left = length
            while left:
                b = fi.read(min(left, 1 << 22))
                if not b:
                    break
                fo.write(b)
                left -= len(b)
                copied += len(b)
        fo.flush()
        os.fsync(fo.fileno())
    return copied
