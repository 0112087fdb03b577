"""Partition tables of a whole disk or disk image: GPT and MBR (with extended chains).

``parse_table`` finds the label, the partitions (numbered as Linux numbers them) and the
exact byte ranges that hold table structures; ``layout`` tiles the disk into table,
partition and gap segments, so a whole-disk archive stores one item per segment and
``extract --stdout`` yields the exact image. ``relocate_backup_gpt`` moves the backup GPT
to the end of a larger target (as ``sfdisk --relocate gpt-bak-std`` and ``sgdisk -e`` do).

Formats: UEFI spec §5.3 (GPT header and entry array) and the MBR/EBR layout as Linux's
block/partitions/msdos.c reads it. Parsing is our own (struct + zlib.crc32) because
libfdisk cannot see a 4096-byte-sector GPT inside an image file and adds a dependency.
"""

from __future__ import annotations

import fcntl
import math
import os
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass, field

from ..blockmap.base import RangeReader
from ..errors import DiskError, SourceError
from .reader import FileRangeReader

GPT_SIGNATURE = b"EFI PART"
MBR_MAGIC = b"\x55\xaa"
MBR_PROTECTIVE = 0xEE
MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
SECTOR_SIZES = (512, 4096)
BLKSSZGET = 0x1268  # ioctl: logical sector size of a block device

_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 bytes of a GPT header
_ENTRY = struct.Struct("<16s16sQQQ72s")  # one 128-byte GPT partition entry
_MBR_ENTRY = struct.Struct("<B3sB3sII")  # one 16-byte MBR/EBR entry
_MBR_ENTRIES_AT = 446
_MAX_ENTRY_ARRAY = 4 << 20  # a sane entry array is 16 KiB; refuse to read megabytes of junk
_ZERO_GUID = bytes(16)
_GPT_BOOTABLE_ATTR = 1 << 2  # "legacy BIOS bootable"


@dataclass(frozen=True)
class Partition:
    """One partition; offsets and sizes in bytes from the start of the disk."""

    number: int  # as Linux numbers it: GPT entry index + 1; MBR slot 1-4, logicals from 5
    start: int
    size: int
    type_id: str  # GPT type GUID (upper case, as sfdisk prints it) or MBR id "0x83"
    type_name: str
    uuid: str | None = None  # GPT partition GUID
    name: str | None = None  # GPT partition name
    bootable: bool = False
    attrs: int = 0  # GPT attribute bits
    kind: str = "primary"  # "primary", "extended" (an MBR container) or "logical"

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def is_container(self) -> bool:
        """An MBR extended partition: it holds EBRs and logical partitions, no data itself."""
        return self.kind == "extended"


@dataclass(frozen=True)
class TableRegion:
    """Bytes holding a table structure: mbr, gpt-header, gpt-entries, gpt-backup-*, ebr."""

    what: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class GptInfo:
    """What a GPT rewrite needs: the trusted header (in primary form) and entry array."""

    header: bytes  # HeaderSize bytes of the header the table was read from
    entries: bytes  # the raw entry array, entry_count * entry_size bytes
    entries_lba: int  # where the primary entry array lives
    backup_lba: int  # where the backup header lives (AlternateLBA of the primary)
    first_usable_lba: int
    last_usable_lba: int


@dataclass
class PartitionTable:
    label: str | None  # "gpt", "dos" or None (no table: a bare filesystem or raw data)
    sector_size: int
    disk_size: int
    disk_id: str | None = None  # GPT disk GUID or MBR signature "0x1a2b3c4d"
    partitions: list[Partition] = field(default_factory=list)
    regions: list[TableRegion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # repairs and oddities worth telling
    gpt: GptInfo | None = None
    mbr: bytes | None = None  # first 512 bytes of LBA 0 when they hold an MBR

    @property
    def data_partitions(self) -> list[Partition]:
        """Partitions that hold data (without MBR extended containers), by start."""
        return sorted((p for p in self.partitions if not p.is_container), key=lambda p: p.start)

    def partition(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        raise DiskError(f"the disk has no partition {number}")


@dataclass(frozen=True)
class Segment:
    """One piece of a disk's tiling: kind "table", "partition" or "gap"."""

    kind: str
    start: int
    size: int
    number: int | None = None  # the partition number, for kind "partition"
    what: str = ""  # the region kind, for kind "table"

    @property
    def end(self) -> int:
        return self.start + self.size


# --- entry points -------------------------------------------------------------------


def read_table(path: str, sector_size: int | None = None) -> PartitionTable:
    """Parse the table of a disk image or block device (a device reports its sector size)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if sector_size is None and stat.S_ISBLK(os.fstat(fd).st_mode):
            try:
                sector_size = device_sector_size(fd)
            except OSError:
                pass  # then the GPT position tells, as for an image
        return parse_table(FileRangeReader(fd, 0, size), sector_size)
    finally:
        os.close(fd)


def device_sector_size(fd: int) -> int:
    """Logical sector size of an open block device (BLKSSZGET)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0])


def parse_table(reader: RangeReader, sector_size: int | None = None) -> PartitionTable:
    """Find and validate the partition table of a whole disk.

    ``sector_size`` is known for a device; for an image it is None and found from where
    the GPT header sits (LBA 1 at 512 or 4096 bytes); an MBR-only image is taken as 512.
    """
    if sector_size is not None and (
        sector_size < 512 or sector_size > 65536 or sector_size & (sector_size - 1)
    ):
        raise DiskError(f"unsupported sector size {sector_size}")
    disk_size = reader.size
    sizes = (sector_size,) if sector_size else SECTOR_SIZES
    mbr = reader.pread(0, 512)
    if len(mbr) == 512 and _is_fs_boot_sector(mbr):
        # a bare FAT/NTFS volume: sector 1 may still hold a stale GPT header, ignore it
        return PartitionTable(None, sector_size or 512, disk_size)
    has_mbr = len(mbr) == 512 and mbr[510:512] == MBR_MAGIC and _mbr_plausible(mbr)
    entries = _mbr_entries(mbr) if has_mbr else []
    protective = any(e[2] == MBR_PROTECTIVE for e in entries)
    primary_ss = next((ss for ss in sizes if _has_gpt_signature(reader, ss)), None)
    # GPT when the MBR says so, or when there is a GPT header and no MBR partitions (a
    # wiped MBR); MBR partitions without a protective entry win over a stale GPT header
    if protective or (primary_ss is not None and not any(e[5] for e in entries)):
        table = _parse_gpt(reader, primary_ss, sizes, mbr if has_mbr else None)
        if not has_mbr:
            table.notes.append("the disk has no protective MBR in front of its GPT")
        elif sum(1 for e in entries if e[5]) > 1:
            table.notes.append("hybrid MBR: its partition entries are ignored, the GPT rules")
    elif has_mbr:
        table = _parse_mbr(reader, mbr, sector_size or 512)
    else:
        return PartitionTable(None, sector_size or 512, disk_size)
    _check_tiling(table)
    return table


def layout(table: PartitionTable) -> list[Segment]:
    """Tile the whole disk, in order, into table, partition and gap segments.

    No holes, no overlaps; the sizes add up to the disk size. Tiny gaps stay segments of
    their own so that concatenating all segments gives back the exact disk image.
    """
    pieces: list[Segment] = [Segment("table", r.start, r.size, what=r.what) for r in table.regions]
    pieces += [Segment("partition", p.start, p.size, p.number) for p in table.data_partitions]
    pieces.sort(key=lambda s: s.start)
    out: list[Segment] = []
    pos = 0
    for seg in pieces:
        if seg.start < pos:  # parse_table refuses such tables; a hand-made one is a bug
            raise DiskError(f"table structures overlap at byte {seg.start}")
        if seg.start > pos:
            out.append(Segment("gap", pos, seg.start - pos))
        out.append(seg)
        pos = seg.end
    if pos > table.disk_size:
        raise DiskError(f"the partition table reaches past the end of the disk (byte {pos})")
    if pos < table.disk_size:
        out.append(Segment("gap", pos, table.disk_size - pos))
    return out


def relocate_backup_gpt(table: PartitionTable, target_size: int) -> list[tuple[int, bytes]]:
    """Writes that make a restored GPT valid on a target of ``target_size`` bytes.

    Byte for byte what ``sfdisk --relocate gpt-bak-std`` writes (``sgdisk -e`` does the
    same but also mirrors the first-usable gap at the end): the backup entries and header
    move to the new end of the disk, the primary header gets the new AlternateLBA and
    LastUsableLBA, CRCs are recomputed, and a purely protective MBR entry grows to cover
    the disk. The primary header and
    entries are written too, so a restore from a table read via its backup repairs the
    damaged primary. An MBR needs nothing: [] is returned.
    """
    if table.label != "gpt" or table.gpt is None:
        return []
    if target_size < table.disk_size:
        raise DiskError(f"target has {target_size} bytes, the disk needs {table.disk_size}")
    g, ss = table.gpt, table.sector_size
    fields = list(_HEADER.unpack_from(g.header))
    count, esize = fields[11], fields[12]
    entry_sectors = math.ceil(count * esize / ss)
    last_lba = target_size // ss - 1
    backup_entries_lba = last_lba - entry_sectors
    if backup_entries_lba - 1 < g.last_usable_lba:
        raise DiskError("target too small for the backup GPT")
    entries = g.entries.ljust(entry_sectors * ss, b"\0")

    def header(my_lba: int, alt_lba: int, entries_lba: int) -> bytes:
        f = list(fields)
        f[3], f[5], f[6], f[8], f[10] = 0, my_lba, alt_lba, backup_entries_lba - 1, entries_lba
        raw = bytearray(g.header)
        _HEADER.pack_into(raw, 0, *f)
        struct.pack_into("<I", raw, 16, zlib.crc32(raw))
        return bytes(raw).ljust(ss, b"\0")

    writes = [
        (ss, header(1, last_lba, g.entries_lba)),
        (g.entries_lba * ss, entries),
        (backup_entries_lba * ss, entries),
        (last_lba * ss, header(last_lba, 1, backup_entries_lba)),
    ]
    pmbr = _protective_entry_patch(table.mbr, last_lba)
    if pmbr is not None:
        writes.insert(0, pmbr)
    return writes


# --- GPT ----------------------------------------------------------------------------


@dataclass
class _Header:
    raw: bytes
    my_lba: int
    alt_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    count: int
    esize: int
    entries: bytes


def _has_gpt_signature(reader: RangeReader, ss: int) -> bool:
    return reader.pread(ss, 8) == GPT_SIGNATURE


def _parse_gpt(
    reader: RangeReader, ss: int | None, sizes: tuple[int, ...], mbr: bytes | None
) -> PartitionTable:
    disk_size = reader.size
    primary_error = "no GPT header at LBA 1"
    if ss is not None:
        try:
            hdr = _read_header(reader, ss, 1)
        except DiskError as e:
            primary_error = str(e)
        else:
            _check_not_truncated(hdr, ss, disk_size)
            notes: list[str] = []
            back = _check_backup(reader, hdr, ss, disk_size, notes)
            backup_entries_lba = back.entries_lba if back else None
            return _gpt_table(hdr, backup_entries_lba, ss, disk_size, mbr, notes)
    # the primary is unusable: a valid backup at the very end of the disk still saves us
    backup_errors = []
    for bss in (ss,) if ss else sizes:
        try:
            back = _read_header(reader, bss, disk_size // bss - 1)
        except DiskError as e:
            backup_errors.append(str(e))
            continue
        notes = [f"primary GPT is damaged ({primary_error}); using the backup GPT"]
        # describe the table as its primary should be: header at LBA 1, entries at LBA 2
        primary = _Header(back.raw, 1, back.my_lba, back.first_usable, back.last_usable,
                          back.disk_guid, 2, back.count, back.esize, back.entries)
        return _gpt_table(primary, back.entries_lba, bss, disk_size, mbr, notes)
    raise DiskError(f"no valid GPT: primary: {primary_error}; backup: {'; '.join(backup_errors)}")


def _read_header(reader: RangeReader, ss: int, lba: int) -> _Header:
    """Read and validate the GPT header at ``lba`` and its entry array (CRCs, bounds)."""
    where = "primary" if lba == 1 else "backup"
    raw = reader.pread(lba * ss, ss)
    if len(raw) < 92 or raw[:8] != GPT_SIGNATURE:
        raise DiskError(f"no {where} GPT header at LBA {lba}")
    f = _HEADER.unpack_from(raw)
    hsize = f[2]
    if not 92 <= hsize <= ss:
        raise DiskError(f"{where} GPT header has an invalid size {hsize}")
    body = raw[:16] + b"\0\0\0\0" + raw[20:hsize]
    if zlib.crc32(body) != f[3]:
        raise DiskError(f"{where} GPT header CRC mismatch")
    my_lba, alt_lba, first, last, guid, e_lba, count, esize, e_crc = f[5:14]
    if my_lba != lba:
        raise DiskError(f"{where} GPT header says it lives at LBA {my_lba}, not {lba}")
    if esize < 128 or esize % 8 or count == 0 or count * esize > _MAX_ENTRY_ARRAY:
        raise DiskError(f"{where} GPT header has an implausible entry array ({count}×{esize})")
    if first > last + 1:
        raise DiskError(f"{where} GPT header has first usable LBA {first} > last {last}")
    e_end = e_lba * ss + count * esize
    if e_lba < 2 or e_end > reader.size:
        raise DiskError(
            f"{where} GPT entry array (LBA {e_lba}) lies outside the disk of {reader.size} bytes"
        )
    entries = reader.pread(e_lba * ss, count * esize)
    if zlib.crc32(entries) != e_crc:
        raise DiskError(f"{where} GPT partition entries CRC mismatch")
    return _Header(raw[:hsize], my_lba, alt_lba, first, last, _guid(guid), e_lba, count,
                   esize, entries)


def _check_not_truncated(hdr: _Header, ss: int, disk_size: int) -> None:
    sectors = disk_size // ss
    if hdr.alt_lba >= sectors or hdr.last_usable >= sectors:
        needed = (max(hdr.alt_lba, hdr.last_usable) + 1) * ss
        raise DiskError(
            f"disk image is truncated: its GPT describes {needed} bytes, "
            f"the image has {disk_size}"
        )


def _check_backup(
    reader: RangeReader, hdr: _Header, ss: int, disk_size: int, notes: list[str]
) -> _Header | None:
    """Read the backup GPT the primary points to; a damaged backup is only worth a note."""
    try:
        back = _read_header(reader, ss, hdr.alt_lba)
    except DiskError as e:
        notes.append(f"backup GPT is damaged ({e}); the primary is intact")
        return None
    if back.entries != hdr.entries:
        notes.append("backup GPT entries differ from the primary; the primary is used")
    if hdr.alt_lba != disk_size // ss - 1:
        notes.append("backup GPT is not at the end of the disk (was the disk enlarged?)")
    return back


def _gpt_table(
    hdr: _Header,
    backup_entries_lba: int | None,
    ss: int,
    disk_size: int,
    mbr: bytes | None,
    notes: list[str],
) -> PartitionTable:
    entry_bytes = math.ceil(hdr.count * hdr.esize / ss) * ss
    if hdr.entries_lba * ss + entry_bytes > hdr.first_usable * ss:
        raise DiskError("GPT entry array overlaps the first usable sector")
    if backup_entries_lba is None:  # a damaged backup: assume the usual place
        backup_entries_lba = hdr.alt_lba - entry_bytes // ss
    regions = [TableRegion("mbr", 0, ss), TableRegion("gpt-header", ss, ss),
               TableRegion("gpt-entries", hdr.entries_lba * ss, entry_bytes)]
    if backup_entries_lba > hdr.last_usable:
        regions.append(TableRegion("gpt-backup-entries", backup_entries_lba * ss, entry_bytes))
    if hdr.alt_lba > hdr.last_usable:
        regions.append(TableRegion("gpt-backup-header", hdr.alt_lba * ss, ss))
    parts = []
    for i in range(hdr.count):
        e = _ENTRY.unpack_from(hdr.entries, i * hdr.esize)
        if e[0] == _ZERO_GUID:
            continue
        first, last = e[2], e[3]
        if not hdr.first_usable <= first <= last <= hdr.last_usable:
            raise DiskError(
                f"GPT partition {i + 1} (sectors {first}-{last}) lies outside the usable "
                f"area {hdr.first_usable}-{hdr.last_usable}"
            )
        type_id = _guid(e[0])
        name = e[5].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(Partition(
            i + 1, first * ss, (last - first + 1) * ss, type_id,
            GPT_TYPES.get(type_id, "unknown"), _guid(e[1]), name or None,
            bool(e[4] & _GPT_BOOTABLE_ATTR), e[4],
        ))
    info = GptInfo(hdr.raw, hdr.entries, hdr.entries_lba, hdr.alt_lba, hdr.first_usable,
                   hdr.last_usable)
    return PartitionTable("gpt", ss, disk_size, hdr.disk_guid, parts, regions, notes, info,
                          mbr)


def _guid(b: bytes) -> str:
    return str(uuid.UUID(bytes_le=bytes(b))).upper()


def _protective_entry_patch(mbr: bytes | None, last_lba: int) -> tuple[int, bytes] | None:
    """The 16-byte write growing a purely protective MBR entry; hybrid MBRs stay as they are."""
    if mbr is None:
        return None
    used = [(i, e) for i, e in enumerate(_mbr_entries(mbr)) if e[5]]
    if len(used) != 1 or used[0][1][2] != MBR_PROTECTIVE or used[0][1][4] != 1:
        return None
    i, e = used[0]
    size = min(last_lba, 0xFFFFFFFF)
    return _MBR_ENTRIES_AT + 16 * i, _MBR_ENTRY.pack(e[0], e[1], e[2], e[3], e[4], size)


# --- MBR ----------------------------------------------------------------------------


def _mbr_entries(sector: bytes) -> list[tuple]:
    return [_MBR_ENTRY.unpack_from(sector, _MBR_ENTRIES_AT + 16 * i) for i in range(4)]


def _is_fs_boot_sector(sector: bytes) -> bool:
    """FAT, exFAT and NTFS boot sectors end in 55AA too; libblkid skips them as well."""
    if sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return True
    return sector[0x36:0x39] == b"FAT" or sector[0x52:0x57] == b"FAT32"


def _mbr_plausible(sector: bytes) -> bool:
    """Like the kernel: boot indicators other than 0x00/0x80 mean these are no entries."""
    return all(e[0] in (0x00, 0x80) for e in _mbr_entries(sector))


def _mbr_partition(number: int, start: int, size: int, typ: int, boot: int, kind: str,
                   ) -> Partition:
    return Partition(number, start, size, f"0x{typ:02x}", MBR_TYPES.get(typ, "unknown"),
                     bootable=boot == 0x80, kind=kind)


def _parse_mbr(reader: RangeReader, mbr: bytes, ss: int) -> PartitionTable:
    disk_size = reader.size
    table = PartitionTable("dos", ss, disk_size, f"0x{struct.unpack_from('<I', mbr, 440)[0]:08x}",
                           regions=[TableRegion("mbr", 0, ss)], mbr=mbr)
    next_logical = 5
    for slot, (boot, _, typ, _, start, count) in enumerate(_mbr_entries(mbr), 1):
        if count == 0:  # Linux skips entries by size, not by type
            continue
        kind = "extended" if typ in MBR_EXTENDED else "primary"
        part = _mbr_partition(slot, start * ss, count * ss, typ, boot, kind)
        if part.end > disk_size:
            raise DiskError(
                f"MBR partition {slot} ends at byte {part.end}, past the end of the disk "
                f"({disk_size} bytes): truncated image or a damaged table"
            )
        table.partitions.append(part)
        if kind == "extended":
            next_logical = _parse_ebr_chain(reader, part, ss, next_logical, table)
    return table


def _parse_ebr_chain(
    reader: RangeReader, ext: Partition, ss: int, number: int, table: PartitionTable
) -> int:
    """Follow the EBR links of ``ext``, adding logical partitions; returns the next number."""
    ext_lba = ext.start // ss
    lba, seen = ext_lba, set()
    while True:
        if lba in seen:
            raise DiskError(f"the EBR chain of partition {ext.number} loops at sector {lba}")
        seen.add(lba)
        if not (ext.start <= lba * ss and (lba + 1) * ss <= ext.end):
            raise DiskError(
                f"an EBR at sector {lba} lies outside extended partition {ext.number}"
            )
        ebr = reader.pread(lba * ss, 512)
        if len(ebr) < 512 or ebr[510:512] != MBR_MAGIC:
            if lba != ext_lba:  # the first EBR may be blank: an extended with no logicals
                table.notes.append(f"EBR at sector {lba} has no signature; chain ends there")
            return number
        table.regions.append(TableRegion("ebr", lba * ss, ss))
        link = None
        for i, (boot, _, typ, _, start, count) in enumerate(_mbr_entries(ebr)):
            if count == 0:
                continue
            if typ in MBR_EXTENDED:
                link = start if link is None else link  # Linux follows the first link only
                continue
            part = _mbr_partition(number, (lba + start) * ss, count * ss, typ, boot, "logical")
            if part.start < ext.start or part.end > ext.end or start == 0:
                if i >= 2:  # like Linux: entries 3-4 of an EBR often hold junk
                    continue
                raise DiskError(
                    f"logical partition {number} lies outside extended partition {ext.number}"
                )
            table.partitions.append(part)
            number += 1
        if link is None:
            return number
        lba = ext_lba + link


def _check_tiling(table: PartitionTable) -> None:
    """Partitions and table structures must be inside the disk and must not overlap."""
    for p in table.partitions:
        if p.size <= 0:
            raise DiskError(f"partition {p.number} has no size")
    items = [(r.start, r.end, f"the {r.what} at byte {r.start}") for r in table.regions]
    items += [(p.start, p.end, f"partition {p.number}") for p in table.data_partitions]
    items.sort(key=lambda i: i[1])
    _check_disjoint(items)
    if items and items[-1][1] > table.disk_size:
        raise DiskError(f"{items[-1][2]} reaches past the end of the disk: truncated image?")
    # an extended container holds only EBRs and logicals: nothing else may reach into it
    outer = [(p.start, p.end, f"partition {p.number}") for p in table.partitions
             if p.kind != "logical"]
    _check_disjoint(outer + [(0, table.sector_size, "the MBR")])


def _check_disjoint(items: list[tuple[int, int, str]]) -> None:
    items = sorted(items)
    for (_, e1, n1), (s2, _, n2) in zip(items, items[1:], strict=False):
        if s2 < e1:
            raise DiskError(f"{n1} overlaps {n2} (at byte {s2})")


GPT_TYPES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": "Microsoft LDM metadata",
    "AF9B60A0-1431-4F62-BC68-3311714A69AD": "Microsoft LDM data",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
    "E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D": "Microsoft Storage Spaces",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": "Linux server data",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM-64)",
    "8DA63339-0007-60C0-C436-083AC8230908": "Linux reserved",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D": "Linux variable data",
    "8484680C-9521-48C6-9C11-B0720656F69E": "Linux /usr (x86-64)",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
    "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
    "516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD data",
    "516E7CB6-6ECF-11D6-8FF8-00022D09712B": "FreeBSD UFS",
    "6A898CC3-1DD2-11B2-99A6-080020736631": "Solaris /usr & Apple ZFS",
}

MBR_TYPES = {
    0x00: "Empty", 0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT", 0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)",
    0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)", 0x11: "Hidden FAT12",
    0x12: "Compaq diagnostics", 0x17: "Hidden HPFS/NTFS", 0x1B: "Hidden W95 FAT32",
    0x1C: "Hidden W95 FAT32 (LBA)", 0x27: "Hidden NTFS WinRE", 0x82: "Linux swap / Solaris",
    0x83: "Linux", 0x85: "Linux extended", 0x86: "NTFS volume set", 0x8E: "Linux LVM",
    0xA5: "FreeBSD", 0xA6: "OpenBSD", 0xA9: "NetBSD", 0xAF: "HFS / HFS+",
    0xDA: "Non-FS data", 0xDE: "Dell Utility", 0xEA: "Linux extended boot",
    0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)", 0xFB: "VMware VMFS", 0xFC: "VMware VMKCORE",
    0xFD: "Linux raid autodetect",
}
