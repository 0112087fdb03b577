"""XFS block map: start all-used, clear the extents of each AG's free-space-by-block btree.

Only the bnobt records count as free: AG headers, the AGFL's blocks (free but reserved
for btree growth; kept, as nothing is gained by proving them free), the internal log and
all metadata stay used. The records of each AG must add up to the AGF's free count.

On-disk bitmaps are only true after a clean unmount: a log holding unreplayed
transactions describes allocations the btrees do not show yet. So the log must end in an
unmount record (found the way the kernel finds the log head), else BlockMapError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from diskvault.blockmap.base import BlockMap, RangeReader
from diskvault.errors import BlockMapError

BB = 512  # XFS "basic block": the log's and daddr's unit
AGF_MAGIC, LOG_MAGIC = b"XAGF", 0xFEEDBABE
BNOBT_MAGIC = {4: b"ABTB", 5: b"AB3B"}
BTREE_HDR = {4: 16, 5: 56}  # short-form btree block header: v4, v5 (CRC, owner, uuid)
MAX_LEVELS = 16
INCOMPAT_KNOWN = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x100  # not NEEDSREPAIR (0x10)
INCOMPAT_META_UUID = 0x4
XLOG_UNMOUNT_TRANS, XLOG_UNMOUNT_TYPE = 0x20, 0x556E
XLOG_HEADER_CYCLE_SIZE = 32768  # bytes of record data one header sector covers
LOG_WINDOW = 4096  # BBs: 8 in-core logs x 256 KiB, the most that may be in flight at once


@dataclass(frozen=True)
class Super:
    version: int  # 4 or 5
    block: int
    sect: int
    dblocks: int
    agblocks: int
    agcount: int
    agblklog: int
    logstart: int  # fsblock (agno << agblklog | agbno)
    logblocks: int
    uuid: bytes  # what v5 metadata blocks are stamped with


def parse_super(sb: bytes, size: int) -> Super:
    if len(sb) < 264 or sb[:4] != b"XFSB":
        raise BlockMapError("not an XFS superblock")
    block, dblocks, rblocks, rextents = struct.unpack_from(">IQQQ", sb, 4)
    uuid = sb[32:48]
    logstart = struct.unpack_from(">Q", sb, 48)[0]
    agblocks, agcount, _rbm, logblocks, vnum, sect = struct.unpack_from(">IIIIHH", sb, 84)
    blocklog, sectlog, agblklog, inprogress = sb[120], sb[121], sb[124], sb[126]
    version = vnum & 0xF
    if version not in (4, 5):
        raise BlockMapError(f"XFS: superblock version {version} not supported")
    if block != 1 << blocklog or not 512 <= block <= 65536 or sect != 1 << sectlog:
        raise BlockMapError("XFS: bad block or sector size")
    if sect < BB or sect > block:
        raise BlockMapError("XFS: bad sector size")
    if inprogress:
        raise BlockMapError("XFS: mkfs did not finish")
    if rblocks or rextents:
        raise BlockMapError("XFS has a realtime section: not supported, reading all")
    if logstart == 0:
        raise BlockMapError("XFS has an external log: its state cannot be checked here")
    if not agcount or not agblocks or agblocks > 1 << agblklog or agblocks <= 1 << agblklog >> 1:
        raise BlockMapError("XFS: bad allocation group geometry")
    if not (agcount - 1) * agblocks < dblocks <= agcount * agblocks:
        raise BlockMapError("XFS: block count does not match the allocation groups")
    if dblocks * block > size:
        raise BlockMapError(f"XFS: filesystem of {dblocks * block} bytes exceeds the "
                            f"{size}-byte partition")
    if version == 5:
        incompat = struct.unpack_from(">I", sb, 216)[0]
        if incompat & ~INCOMPAT_KNOWN:
            raise BlockMapError(f"XFS: unknown or needs-repair incompat features {incompat:#x}")
        if incompat & INCOMPAT_META_UUID:
            uuid = sb[248:264]
    return Super(version, block, sect, dblocks, agblocks, agcount, agblklog, logstart,
                 logblocks, uuid)


def detect(reader: RangeReader) -> bool:
    return reader.pread(0, 4) == b"XFSB"


def build(reader: RangeReader) -> BlockMap:
    sb = parse_super(reader.pread(0, 512), reader.size)
    check_log_clean(reader, sb)
    bmap = BlockMap.empty(reader.size, sb.block, "xfs")
    bmap.bits[:] = 0xFF
    for agno in range(sb.agcount):
        base = agno * sb.agblocks
        for start, count in free_extents(reader, sb, agno):
            bmap.mark_free(base + start, count)
    return bmap


def _read(reader: RangeReader, offset: int, size: int, what: str) -> bytes:
    data = reader.pread(offset, size)
    if len(data) != size:
        raise BlockMapError(f"XFS: {what} lies past the end of the partition")
    return data


def free_extents(reader: RangeReader, sb: Super, agno: int) -> list[tuple[int, int]]:
    """(agbno, length) of every free extent of one AG, checked against the AGF."""
    ag_off = agno * sb.agblocks * sb.block
    agf = _read(reader, ag_off + sb.sect, 224, f"AGF {agno}")
    magic, ver, seqno, length, bno_root, _c, _r, bno_level = struct.unpack_from(">4sIIIIIII",
                                                                               agf, 0)
    freeblks = struct.unpack_from(">I", agf, 52)[0]
    expect_len = min(sb.agblocks, sb.dblocks - agno * sb.agblocks)
    if magic != AGF_MAGIC or ver != 1 or seqno != agno or length != expect_len:
        raise BlockMapError(f"XFS: AGF {agno} header is invalid")
    if sb.version == 5 and agf[64:80] != sb.uuid:
        raise BlockMapError(f"XFS: AGF {agno} belongs to another filesystem")
    if not 1 <= bno_level <= MAX_LEVELS or not 0 < bno_root < length or freeblks > length:
        raise BlockMapError(f"XFS: AGF {agno} free-space btree root is invalid")

    hdr, bs = BTREE_HDR[sb.version], sb.block
    level_nodes = [bno_root]
    recs: list[tuple[int, int]] = []
    visited = 0
    for level in range(bno_level - 1, -1, -1):
        children: list[int] = []
        for agbno in level_nodes:
            visited += 1
            if not 0 < agbno < length or visited > length:
                raise BlockMapError(f"XFS: AG {agno} free-space btree points outside the AG")
            blk = _read(reader, ag_off + agbno * bs, bs, f"AG {agno} btree block")
            numrecs = _check_node(blk, sb, agno, agbno, level)
            if level == 0:
                if numrecs > (bs - hdr) // 8:
                    raise BlockMapError(f"XFS: AG {agno} btree leaf overfull")
                flat = struct.unpack_from(f">{2 * numrecs}I", blk, hdr)
                recs.extend(zip(flat[0::2], flat[1::2], strict=True))
            else:
                maxrecs = (bs - hdr) // 12
                if not 0 < numrecs <= maxrecs:
                    raise BlockMapError(f"XFS: AG {agno} btree node has {numrecs} records")
                children.extend(struct.unpack_from(f">{numrecs}I", blk, hdr + maxrecs * 8))
        level_nodes = children

    total, prev_end = 0, 0
    for start, count in recs:
        if count == 0 or start < prev_end or start + count > length:
            raise BlockMapError(f"XFS: AG {agno} free extents overlap or leave the AG")
        prev_end = start + count
        total += count
    if total != freeblks:
        raise BlockMapError(f"XFS: AG {agno} free extents add up to {total} blocks, "
                            f"the AGF says {freeblks}")
    return recs


def _check_node(blk: bytes, sb: Super, agno: int, agbno: int, level: int) -> int:
    """Verify a bnobt block's header (and v5 self-description); return numrecs."""
    magic, lvl, numrecs = struct.unpack_from(">4sHH", blk, 0)
    if magic != BNOBT_MAGIC[sb.version] or lvl != level:
        raise BlockMapError(f"XFS: AG {agno} block {agbno} is not a level-{level} "
                            "free-space btree block")
    if sb.version == 5:
        blkno = struct.unpack_from(">Q", blk, 16)[0]
        owner = struct.unpack_from(">I", blk, 48)[0]
        daddr = (agno * sb.agblocks + agbno) * (sb.block // BB)
        if blkno != daddr or owner != agno or blk[32:48] != sb.uuid:
            raise BlockMapError(f"XFS: AG {agno} block {agbno} is a stale btree block")
    return numrecs


# --- the log ------------------------------------------------------------------


def check_log_clean(reader: RangeReader, sb: Super) -> None:
    """Raise BlockMapError unless the internal log ends in an unmount record."""
    agno, agbno = sb.logstart >> sb.agblklog, sb.logstart & ((1 << sb.agblklog) - 1)
    start = (agno * sb.agblocks + agbno) * sb.block
    nbb = sb.logblocks * sb.block // BB
    if agno >= sb.agcount or start + nbb * BB > sb.dblocks * sb.block or nbb < 64:
        raise BlockMapError("XFS: internal log lies outside the filesystem")
    log = _Log(reader, start, nbb)
    first, last = log.cycle(0), log.cycle(nbb - 1)
    if first == 0:
        if log.read(0, min(nbb, LOG_WINDOW)).count(0) == min(nbb, LOG_WINDOW) * BB:
            return  # a zeroed log (xfs_repair -L): nothing to replay
        raise BlockMapError("XFS log is damaged: first block has cycle 0")
    if first == last:
        head, cycle = 0, first + 1  # the pass just wrapped: the next one starts at 0
    elif last == first - 1:
        lo, hi = 0, nbb - 1  # cycle(lo) == first, cycle(hi) == last: find the boundary
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if log.cycle(mid) == first:
                lo = mid
            else:
                hi = mid
        head, cycle = hi, first
    else:
        raise BlockMapError(f"XFS log cycles {first}/{last} are inconsistent: log is dirty")
    rec = log.verify_window(head, cycle)
    if not _is_unmount_record(log, rec, head):
        raise BlockMapError("XFS log is dirty (not unmounted cleanly): the free-space "
                            "btrees may be stale until the log is replayed")


class _Log:
    def __init__(self, reader: RangeReader, start: int, nbb: int) -> None:
        self.r, self.start, self.nbb = reader, start, nbb

    def read(self, bb: int, count: int) -> bytes:
        """``count`` BBs from log block ``bb``, wrapping at the end of the log."""
        out = bytearray()
        while count > 0:
            bb %= self.nbb
            n = min(count, self.nbb - bb)
            out += _read(self.r, self.start + bb * BB, n * BB, "log")
            bb, count = bb + n, count - n
        return bytes(out)

    def cycle(self, bb: int) -> int:
        return _cycle_of(self.read(bb, 1), 0)

    def verify_window(self, head: int, cycle: int) -> int:
        """Check that the BBs around the head carry the cycles a finished log leaves, and
        return the position of the last record header before the head.

        Up to LOG_WINDOW BBs may be written out of order; a hole there means a crash.
        """
        w = min(LOG_WINDOW, self.nbb // 2)
        words = np.frombuffer(self.read(head - w, 2 * w), dtype=">u4").reshape(2 * w, BB // 4)
        is_hdr = words[:, 0] == LOG_MAGIC
        cycles = np.where(is_hdr, words[:, 1], words[:, 0]).astype(np.int64)
        pos = np.arange(head - w, head + w)  # "virtual" positions: <0 previous pass
        # before the head: the pass that wrote each BB; after it: the pass before that
        want = cycle + pos // self.nbb - (pos >= head)
        if not np.array_equal(cycles, want):
            raise BlockMapError("XFS log has a hole near its head: it is dirty")
        headers = np.flatnonzero(is_hdr[:w])
        if not len(headers):
            raise BlockMapError("XFS log: no record header near the head")
        return int(pos[headers[-1]]) % self.nbb


def _cycle_of(buf: bytes, off: int) -> int:
    """A log BB's cycle: from the header if it is one, else its stamped first word."""
    word = struct.unpack_from(">I", buf, off)[0]
    return struct.unpack_from(">I", buf, off + 4)[0] if word == LOG_MAGIC else word


def _is_unmount_record(log: _Log, rec: int, head: int) -> bool:
    hdr = log.read(rec, 1)
    version, h_len = struct.unpack_from(">II", hdr, 8)
    num_ops = struct.unpack_from(">I", hdr, 40)[0]
    h_size = struct.unpack_from(">I", hdr, 320)[0]
    if version not in (1, 2):
        return False
    hblks = 1
    if version == 2 and h_size > XLOG_HEADER_CYCLE_SIZE:
        hblks = -(-h_size // XLOG_HEADER_CYCLE_SIZE)
    if (rec + hblks + -(-h_len // BB)) % log.nbb != head % log.nbb or num_ops != 1:
        return False
    data = log.read(rec + hblks, 1)
    # op header: tid (overwritten by the cycle stamp), len, clientid, flags; then the
    # unmount payload, whose magic is written in the CPU's byte order
    oh_flags = data[9]
    magic = data[12:14]
    return bool(oh_flags & XLOG_UNMOUNT_TRANS) and XLOG_UNMOUNT_TYPE in (
        int.from_bytes(magic, "little"), int.from_bytes(magic, "big"))
