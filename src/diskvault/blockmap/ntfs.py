"""NTFS block map: the $Bitmap file (MFT record 6) is the volume's cluster bitmap.

Its bits are LSB first, one per cluster, exactly like ``BlockMap.bits``, so they copy
straight in. What the bitmap cannot vouch for stays used: the sectors past the last
cluster (the backup boot sector lives there) and any volume Windows may still change
on resume — dirty, being checked, an unclean $LogFile, or a hibernation file in use.
ntfsclone refuses the dirty case too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from diskvault.blockmap.base import BlockMap, RangeReader, packed_len
from diskvault.errors import BlockMapError

NTFS_BLOCK = 512  # update-sequence stride, fixed by the format whatever the sector size
AT_ATTRIBUTE_LIST = 0x20
AT_FILE_NAME = 0x30
AT_VOLUME_INFORMATION = 0x70
AT_DATA = 0x80
AT_INDEX_ROOT = 0x90
AT_INDEX_ALLOCATION = 0xA0
AT_END = 0xFFFFFFFF
REC_LOGFILE, REC_VOLUME, REC_ROOT, REC_BITMAP = 2, 3, 5, 6
ATTR_COMPRESSED_OR_ENCRYPTED = 0x00FF | 0x4000  # runs would not be plain bytes
VOLUME_IS_DIRTY = 0x0001
VOLUME_CHKDSK_UNDERWAY = 0x4000
RESTART_VOLUME_IS_CLEAN = 0x0002
LOGFILE_NO_CLIENT = 0xFFFF
INDEX_ENTRY_NODE, INDEX_ENTRY_END = 0x01, 0x02
MAX_INDEX_NODES = 4096  # bound on the root-directory walk, against loops in a bad index
HIBERFILE_SAFE = (b"\0\0\0\0", b"wake", b"WAKE")  # resumed, or never hibernated


@dataclass(frozen=True)
class Run:
    vcn: int
    lcn: int | None  # None: a sparse run (reads as zeros)
    length: int


@dataclass(frozen=True)
class Attr:
    """One attribute record, as found in an MFT record (fixups already applied)."""

    type: int
    name: str
    flags: int  # compressed / encrypted / sparse
    resident: bool
    value: bytes  # resident value, or b"" for non-resident
    lowest_vcn: int
    highest_vcn: int
    data_size: int
    init_size: int
    runs: tuple[Run, ...]


def detect(reader: RangeReader) -> bool:
    head = reader.pread(0, 512)
    return len(head) == 512 and head[3:11] == b"NTFS    " and head[510:512] == b"\x55\xaa"


def build(reader: RangeReader) -> BlockMap:
    vol = Volume(reader)
    vol.check_clean()
    return vol.block_map()


def apply_fixups(buf: bytes, magic: bytes, what: str) -> bytes:
    """Verify and undo the update-sequence array of a multi-sector record.

    A stride whose last two bytes do not carry the sequence number was torn mid-write.
    """
    if buf[:4] != magic:
        raise BlockMapError(f"NTFS {what}: bad magic {buf[:4]!r}, expected {magic!r}")
    usa_ofs, usa_count = struct.unpack_from("<HH", buf, 4)
    if (
        usa_ofs & 1
        or usa_count - 1 != len(buf) // NTFS_BLOCK
        or usa_ofs + 2 * usa_count > NTFS_BLOCK - 2
    ):
        raise BlockMapError(f"NTFS {what}: bad update sequence array")
    out = bytearray(buf)
    usn = buf[usa_ofs : usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * NTFS_BLOCK
        if out[end - 2 : end] != usn:
            raise BlockMapError(f"NTFS {what}: update sequence mismatch (torn write)")
        out[end - 2 : end] = buf[usa_ofs + 2 * i : usa_ofs + 2 * i + 2]
    return bytes(out)


def decode_runlist(data: bytes, start_vcn: int, nr_clusters: int, what: str) -> list[Run]:
    """Decode NTFS mapping pairs: (length, signed LCN delta) per run, ended by 0."""
    runs: list[Run] = []
    pos, vcn, lcn = 0, start_vcn, 0
    while True:
        if pos >= len(data):
            raise BlockMapError(f"NTFS {what}: runlist not terminated")
        head = data[pos]
        if head == 0:
            return runs
        nlen, noff = head & 0x0F, head >> 4
        if nlen == 0 or nlen > 8 or noff > 8 or pos + 1 + nlen + noff > len(data):
            raise BlockMapError(f"NTFS {what}: bad runlist header byte {head:#x}")
        length = int.from_bytes(data[pos + 1 : pos + 1 + nlen], "little", signed=True)
        if length <= 0:
            raise BlockMapError(f"NTFS {what}: run of length {length}")
        if noff == 0:
            runs.append(Run(vcn, None, length))
        else:
            lcn += int.from_bytes(data[pos + 1 + nlen : pos + 1 + nlen + noff], "little",
                                  signed=True)
            if lcn < 0 or lcn + length > nr_clusters:
                raise BlockMapError(f"NTFS {what}: run outside the volume (lcn {lcn})")
            runs.append(Run(vcn, lcn, length))
        vcn += length
        pos += 1 + nlen + noff


def parse_attrs(rec: bytes, nr_clusters: int, what: str) -> list[Attr]:
    """Every attribute record of one MFT record, in on-disk order."""
    attrs_ofs = struct.unpack_from("<H", rec, 0x14)[0]
    in_use = struct.unpack_from("<I", rec, 0x18)[0]
    if in_use > len(rec) or attrs_ofs >= in_use:
        raise BlockMapError(f"NTFS {what}: bad record header")
    out: list[Attr] = []
    pos = attrs_ofs
    while True:
        if pos + 4 > in_use:
            raise BlockMapError(f"NTFS {what}: attribute list runs off the record")
        if struct.unpack_from("<I", rec, pos)[0] == AT_END:
            return out
        if pos + 8 > in_use:
            raise BlockMapError(f"NTFS {what}: attribute runs off the record")
        atype, alen = struct.unpack_from("<II", rec, pos)
        if alen < 24 or alen & 7 or pos + alen > in_use:
            raise BlockMapError(f"NTFS {what}: bad attribute length {alen}")
        a = rec[pos : pos + alen]
        nonres, name_len = a[8], a[9]
        name_ofs, aflags = struct.unpack_from("<HH", a, 10)
        name = a[name_ofs : name_ofs + 2 * name_len].decode("utf-16-le", "replace")
        if not nonres:
            vlen, vofs = struct.unpack_from("<IH", a, 0x10)
            if vofs + vlen > alen:
                raise BlockMapError(f"NTFS {what}: resident value overflows")
            value = a[vofs : vofs + vlen]
            out.append(Attr(atype, name, aflags, True, value, 0, 0, vlen, vlen, ()))
        else:
            if alen < 0x40:
                raise BlockMapError(f"NTFS {what}: short non-resident attribute")
            low, high = struct.unpack_from("<qq", a, 0x10)
            mp_ofs = struct.unpack_from("<H", a, 0x20)[0]
            data_size, init_size = struct.unpack_from("<qq", a, 0x30)
            if mp_ofs >= alen or low < 0 or high < low - 1:
                raise BlockMapError(f"NTFS {what}: bad non-resident header")
            runs = decode_runlist(a[mp_ofs:], low, nr_clusters, what)
            if (runs[-1].vcn + runs[-1].length if runs else low) != high + 1:
                raise BlockMapError(f"NTFS {what}: runlist does not cover VCNs {low}..{high}")
            out.append(Attr(atype, name, aflags, False, b"", low, high, data_size, init_size,
                            tuple(runs)))
        pos += alen


class Volume:
    """Just enough of an NTFS volume to read metadata files by MFT record number."""

    def __init__(self, reader: RangeReader) -> None:
        self.r = reader
        boot = reader.pread(0, 512)
        if not detect(reader):
            raise BlockMapError("not an NTFS boot sector")
        bps, spc_raw = struct.unpack_from("<HB", boot, 0x0B)
        if bps < 256 or bps > 4096 or bps & (bps - 1):
            raise BlockMapError(f"NTFS: bad bytes per sector {bps}")
        # values above 0x80 encode a power of two: 2**(256 - value) sectors (>64 KiB clusters)
        spc = spc_raw if spc_raw <= 0x80 else 1 << (256 - spc_raw)
        if spc == 0 or spc & (spc - 1) or spc * bps > 2 << 20:  # 0: no power of two
            raise BlockMapError(f"NTFS: bad sectors per cluster {spc_raw}")
        if boot[0x0E:0x10] != b"\0\0" or boot[0x10] or boot[0x11:0x15] != b"\0\0\0\0":
            raise BlockMapError("NTFS: BPB fields that must be zero are not")
        nsect, self.mft_lcn, _mirr = struct.unpack_from("<qqq", boot, 0x28)
        self.cluster = bps * spc
        self.nr_clusters = nsect // spc
        if nsect <= 0 or nsect * bps > reader.size:
            raise BlockMapError(
                f"NTFS: volume of {nsect} sectors does not fit the {reader.size}-byte partition"
            )
        cpr = struct.unpack_from("<b", boot, 0x40)[0]
        self.rec_size = cpr * self.cluster if cpr > 0 else 1 << -cpr if cpr > -31 else 0
        if not NTFS_BLOCK <= self.rec_size <= 65536 or self.rec_size & (self.rec_size - 1):
            raise BlockMapError(f"NTFS: bad MFT record size {self.rec_size}")
        if not 0 < self.mft_lcn < self.nr_clusters:
            raise BlockMapError("NTFS: $MFT location outside the volume")
        self.mft_runs = self._bootstrap_mft()

    # --- reading -------------------------------------------------------------

    def read_runs(self, runs: tuple[Run, ...] | list[Run], offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of an attribute's data through its runlist."""
        out = bytearray()
        cs = self.cluster
        for run in runs:
            lo, hi = run.vcn * cs, (run.vcn + run.length) * cs
            a, z = max(lo, offset + len(out)), min(hi, offset + size)
            if a >= z:
                continue
            if a != offset + len(out):
                break  # a gap in the runlist: caught by the length check below
            if run.lcn is None:
                out += bytes(z - a)
            else:
                got = self.r.pread(run.lcn * cs + (a - lo), z - a)
                if len(got) != z - a:
                    raise BlockMapError("NTFS: metadata read past the end of the partition")
                out += got
        if len(out) != size:
            raise BlockMapError("NTFS: attribute data not covered by its runlist")
        return bytes(out)

    def _bootstrap_mft(self) -> list[Run]:
        raw = self.r.pread(self.mft_lcn * self.cluster, self.rec_size)
        if len(raw) != self.rec_size:
            raise BlockMapError("NTFS: $MFT record 0 past the end of the partition")
        attrs = parse_attrs(apply_fixups(raw, b"FILE", "MFT record 0"), self.nr_clusters,
                            "MFT record 0")
        first = [a for a in attrs if a.type == AT_DATA and not a.name and a.lowest_vcn == 0]
        if len(first) != 1 or first[0].resident:
            raise BlockMapError("NTFS: $MFT has no usable $DATA attribute")
        self.mft_runs = list(first[0].runs)
        # extension records of a fragmented $MFT are read through the part known so far
        return list(self.attr_runs(0, AT_DATA)[0])

    def record(self, number: int) -> bytes:
        what = f"MFT record {number}"
        raw = self.read_runs(self.mft_runs, number * self.rec_size, self.rec_size)
        rec = apply_fixups(raw, b"FILE", what)
        if not struct.unpack_from("<H", rec, 0x16)[0] & 1:
            raise BlockMapError(f"NTFS {what} is not in use")
        return rec

    def attrs(self, number: int) -> list[Attr]:
        return parse_attrs(self.record(number), self.nr_clusters, f"MFT record {number}")

    def attr_pieces(self, number: int, atype: int, name: str = "") -> list[Attr]:
        """All pieces of one attribute, following $ATTRIBUTE_LIST into extension records."""
        base = self.attrs(number)
        lists = [a for a in base if a.type == AT_ATTRIBUTE_LIST]
        if not lists:
            return [a for a in base if a.type == atype and a.name == name]
        al = lists[0]
        data = al.value if al.resident else self.read_runs(al.runs, 0, al.data_size)
        pieces: list[Attr] = []
        pos = 0
        while pos + 26 <= len(data):
            etype, elen, nlen, nofs = struct.unpack_from("<IHBB", data, pos)
            if elen < 26 or pos + elen > len(data):
                raise BlockMapError(f"NTFS MFT record {number}: bad attribute list entry")
            ename = data[pos + nofs : pos + nofs + 2 * nlen].decode("utf-16-le", "replace")
            low, ref = struct.unpack_from("<qQ", data, pos + 8)
            if etype == atype and ename == name:
                recno = ref & 0xFFFFFFFFFFFF
                found = [a for a in (base if recno == number else self.attrs(recno))
                         if a.type == atype and a.name == name and a.lowest_vcn == low]
                if len(found) != 1:
                    raise BlockMapError(f"NTFS MFT record {number}: attribute list "
                                        f"points to a missing attribute in record {recno}")
                pieces.append(found[0])
            pos += elen
        return pieces

    def attr_runs(self, number: int, atype: int, name: str = "") -> tuple[list[Run], Attr]:
        """The whole runlist of a non-resident attribute and its first piece (the sizes)."""
        pieces = sorted(self.attr_pieces(number, atype, name), key=lambda a: a.lowest_vcn)
        if not pieces or pieces[0].resident or pieces[0].lowest_vcn != 0:
            raise BlockMapError(f"NTFS MFT record {number}: no non-resident attribute "
                                f"{atype:#x} {name!r}")
        if pieces[0].flags & ATTR_COMPRESSED_OR_ENCRYPTED:
            raise BlockMapError(f"NTFS MFT record {number}: attribute {atype:#x} is "
                                "compressed or encrypted")
        runs: list[Run] = []
        for prev, nxt in zip(pieces, pieces[1:], strict=False):
            if nxt.resident or nxt.lowest_vcn != prev.highest_vcn + 1:
                raise BlockMapError(f"NTFS MFT record {number}: attribute pieces do not chain")
        for p in pieces:
            runs.extend(p.runs)
        return runs, pieces[0]

    def attr_data(self, number: int, atype: int, name: str = "", limit: int = -1) -> bytes:
        """An attribute's value (resident or not), up to ``limit`` bytes if given."""
        pieces = [a for a in self.attr_pieces(number, atype, name) if a.lowest_vcn == 0]
        if len(pieces) != 1:
            raise BlockMapError(f"NTFS MFT record {number}: attribute {atype:#x} {name!r} "
                                "missing or duplicated")
        size = pieces[0].data_size if limit < 0 else min(limit, pieces[0].data_size)
        if pieces[0].resident:
            return pieces[0].value[:size]
        runs, first = self.attr_runs(number, atype, name)
        data = self.read_runs(runs, 0, size)
        if first.init_size < size:  # bytes past the initialized size read as zeros
            data = data[: first.init_size] + bytes(size - first.init_size)
        return data

    # --- safety checks -------------------------------------------------------

    def check_clean(self) -> None:
        """Refuse a volume whose on-disk metadata Windows may still change or replay."""
        vi = self.attr_data(REC_VOLUME, AT_VOLUME_INFORMATION)
        if len(vi) < 12:
            raise BlockMapError("NTFS: $Volume information too short")
        flags = struct.unpack_from("<H", vi, 10)[0]
        if flags & VOLUME_IS_DIRTY:
            raise BlockMapError("NTFS volume is marked dirty (run chkdsk or ntfsfix -d)")
        if flags & VOLUME_CHKDSK_UNDERWAY:
            raise BlockMapError("NTFS volume is marked as being checked by chkdsk")
        self._check_logfile()
        self._check_hiberfile()

    def _check_logfile(self) -> None:
        """A $LogFile with open clients and no clean flag means metadata waits for replay."""
        runs, first = self.attr_runs(REC_LOGFILE, AT_DATA)
        head = self.read_runs(runs, 0, min(first.data_size, 65536))
        if head.count(0xFF) == len(head):
            return  # emptied by ntfs-3g or mkntfs: nothing to replay
        best: tuple[int, int, int] | None = None  # (current_lsn, client_in_use, flags)
        # the two restart pages sit at 0 and one system page further; probe every size
        for pos in [0] + [1 << k for k in range(9, 16)]:
            magic = head[pos : pos + 4]
            if magic == b"CHKD":
                raise BlockMapError("NTFS $LogFile was modified by chkdsk")
            if magic != b"RSTR":
                continue
            page = struct.unpack_from("<I", head, pos + 16)[0]
            if page < NTFS_BLOCK or page & (page - 1) or pos + page > len(head):
                raise BlockMapError("NTFS $LogFile: bad restart page size")
            rp = apply_fixups(head[pos : pos + page], b"RSTR", "$LogFile restart page")
            ra = struct.unpack_from("<H", rp, 24)[0]
            if ra + 16 > page:
                raise BlockMapError("NTFS $LogFile: bad restart area offset")
            lsn, _clients, _free, in_use, rflags = struct.unpack_from("<qHHHH", rp, ra)
            if best is None or lsn > best[0]:
                best = (lsn, in_use, rflags)
        if best is None:
            raise BlockMapError("NTFS $LogFile: no valid restart page (chkdsk'd or damaged)")
        if best[1] != LOGFILE_NO_CLIENT and not best[2] & RESTART_VOLUME_IS_CLEAN:
            raise BlockMapError("NTFS $LogFile is not clean: Windows did not shut down "
                                "cleanly (or fast startup is on)")

    def _check_hiberfile(self) -> None:
        ref = self.find_in_root("hiberfil.sys")
        if ref is None:
            return
        sig = self.attr_data(ref, AT_DATA, limit=4)
        if len(sig) == 4 and sig not in HIBERFILE_SAFE:
            raise BlockMapError(f"NTFS: hiberfil.sys header {sig!r}: Windows is hibernated "
                                "(or fast startup is on)")

    def find_in_root(self, name: str) -> int | None:
        """MFT record number of a root-directory entry (case-insensitive), by walking
        every live node of the $I30 index: no collation rules needed."""
        want = name.lower()
        root = self.attr_data(REC_ROOT, AT_INDEX_ROOT, "$I30")
        if len(root) < 32:
            raise BlockMapError("NTFS: root $INDEX_ROOT too short")
        block_size = struct.unpack_from("<I", root, 8)[0]
        found, children = _scan_index_node(root, 16, want)
        if found is not None or not children:
            return found
        if block_size < NTFS_BLOCK or block_size & (block_size - 1):
            raise BlockMapError("NTFS: bad root index block size")
        runs, first = self.attr_runs(REC_ROOT, AT_INDEX_ALLOCATION, "$I30")
        # VCNs count clusters, or 512-byte units when index blocks are smaller than a cluster
        unit = self.cluster if block_size >= self.cluster else NTFS_BLOCK
        seen: set[int] = set()
        while children:
            vcn = children.pop()
            if vcn in seen or len(seen) > MAX_INDEX_NODES:
                raise BlockMapError("NTFS: root directory index loops")
            seen.add(vcn)
            if vcn * unit + block_size > first.data_size:
                raise BlockMapError("NTFS: root index points past its allocation")
            raw = self.read_runs(runs, vcn * unit, block_size)
            blk = apply_fixups(raw, b"INDX", "root index block")
            found, sub = _scan_index_node(blk, 0x18, want)
            if found is not None:
                return found
            children.extend(sub)
        return None

    # --- the map ---------------------------------------------------------------

    def block_map(self) -> BlockMap:
        runs, first = self.attr_runs(REC_BITMAP, AT_DATA)
        need = packed_len(self.nr_clusters)
        if first.data_size < need or first.init_size < need:
            raise BlockMapError(f"NTFS $Bitmap holds {first.init_size} bytes, the volume "
                                f"needs {need}")
        bitmap = np.frombuffer(self.read_runs(runs, 0, need), dtype=np.uint8)
        bmap = BlockMap.empty(self.r.size, self.cluster, "ntfs")
        bmap.bits[:need] = bitmap
        # clusters past the volume (the backup boot sector) and stray bits after the last
        # cluster: used
        bmap.mark_used(self.nr_clusters, bmap.nblocks - self.nr_clusters)
        self._sanity(bmap, runs)
        return bmap

    def _sanity(self, bmap: BlockMap, bitmap_runs: list[Run]) -> None:
        """Clusters that must be in use are: else the bitmap is not what we think."""
        must = [(0, 1)] + [(r.lcn, r.length) for r in self.mft_runs + bitmap_runs
                           if r.lcn is not None]
        for lcn, length in must:
            if not all_set(bmap.bits, lcn, length):
                raise BlockMapError(f"NTFS $Bitmap marks in-use metadata cluster {lcn} free")


def all_set(bits: np.ndarray, first: int, count: int) -> bool:
    """True if bits ``[first, first+count)`` of a packed LSB-first bitmap are all 1."""
    window = bits[first // 8 : (first + count + 7) // 8]
    bools = np.unpackbits(window, bitorder="little")[first % 8 : first % 8 + count]
    return len(bools) == count and bool(bools.all())


def _scan_index_node(buf: bytes, hdr: int, want: str) -> tuple[int | None, list[int]]:
    """Look for ``want`` among one index node's entries; return (match, child VCNs)."""
    entries_ofs, index_len = struct.unpack_from("<II", buf, hdr)
    pos, end = hdr + entries_ofs, min(hdr + index_len, len(buf))
    children: list[int] = []
    while pos + 16 <= end:
        ref, elen, klen, eflags = struct.unpack_from("<QHHH", buf, pos)
        if elen < 16 or pos + elen > end:
            raise BlockMapError("NTFS: bad root index entry")
        if eflags & INDEX_ENTRY_NODE:
            children.append(struct.unpack_from("<q", buf, pos + elen - 8)[0])
        if eflags & INDEX_ENTRY_END:
            return None, children
        if klen >= 0x42:
            nlen = buf[pos + 16 + 0x40]
            fname = buf[pos + 16 + 0x42 : pos + 16 + 0x42 + 2 * nlen]
            if fname.decode("utf-16-le", "replace").lower() == want:
                return ref & 0xFFFFFFFFFFFF, []
        pos += elen
    raise BlockMapError("NTFS: root index node has no end entry")
