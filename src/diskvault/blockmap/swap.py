"""Block map of a Linux swap area: only the header page holds anything worth keeping.

Swapped-out pages are meaningless once the system that wrote them is gone, so a swap
partition backs up as its header (signature, UUID, label). The exception is a
hibernation image: resuming needs every page, so such an area is all used.
Format: Linux ``include/linux/swap.h`` (``union swap_header``); the signature sits in
the last 10 bytes of the first page, whose size is the writer's page size.
"""

from __future__ import annotations

import struct

from diskvault.blockmap.base import BlockMap, RangeReader
from diskvault.errors import BlockMapError

_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)  # as blkid tries them
_SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
# hibernation signatures that replace the swap magic (kernel swsusp, uswsusp, TuxOnIce)
_HIBERNATION_MAGICS = (
    b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001", b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c",
)


def _signature(reader: RangeReader) -> tuple[int, bytes] | None:
    """(page size, magic) of the first page size whose page end carries a known magic."""
    for ps in _PAGE_SIZES:
        if ps > reader.size:
            break
        sig = reader.pread(ps - 10, 10)
        for magic in _SWAP_MAGICS + _HIBERNATION_MAGICS:
            if sig.startswith(magic):
                return ps, magic
    return None


def detect(reader: RangeReader) -> bool:
    return _signature(reader) is not None


def build(reader: RangeReader) -> BlockMap:
    found = _signature(reader)
    if found is None:
        raise BlockMapError("no Linux swap signature")
    ps, magic = found
    if magic in _HIBERNATION_MAGICS:
        return BlockMap.all_used(
            reader.size, "swap", note="swap holds a hibernation image: all blocks read"
        )
    if magic != b"SWAPSPACE2":
        raise BlockMapError("old (v0) swap format: all blocks read")
    header = reader.pread(1024, 12)
    if len(header) != 12:
        raise BlockMapError("swap header is truncated")
    # the header is in the writer's byte order; version 1 tells which one it is
    for order in ("<", ">"):
        version, last_page, _nr_bad = struct.unpack(order + "III", header)
        if version == 1:
            break
    else:
        raise BlockMapError(f"swap header has unknown version {version}")
    pages = reader.size // ps
    if last_page == 0 or last_page >= pages:
        raise BlockMapError(
            f"swap header says {last_page + 1} pages, the device holds {pages}: truncated?"
        )
    bmap = BlockMap.empty(reader.size, ps, "swap")
    bmap.mark_used(0, 1)  # the header page
    # pages past last_page are not swap space: whatever they hold is kept
    bmap.mark_used(last_page + 1, pages - last_page - 1)
    return bmap
