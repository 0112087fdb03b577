"""Whole-disk archives: one item per piece of the disk's layout, in disk order.

The disk is tiled by ``source.partitions.layout`` into table structures, partitions and
gaps; each becomes one item, so concatenating the items (``extract --stdout``) gives the
disk image back byte for byte — except that unused filesystem blocks come back as zeros.
Item paths (``extract REPO::ARCHIVE disk/part2`` gives one partition image):

- ``disk/table-mbr``, ``disk/table-gpt-header``, ``disk/table-gpt-entries``,
  ``disk/table-gpt-backup-entries``, ``disk/table-gpt-backup-header``,
  ``disk/table-ebr-<sector>`` (one per logical partition): source ``table``
- ``disk/part<N>``: partition N, source ``partition``, with its filesystem type, block
  map (free blocks are ``unused`` extents: never read or stored) and a note when the map
  was not applied. An MBR extended container is no item: its EBRs are table items, its
  logical partitions are partitions, and the rest of it is gaps.
- ``disk/gap-<byte offset>``: unpartitioned bytes. Read whole where boot loaders live:
  everything before the first partition, and gaps of up to ``KEEP_GAP`` (1 MiB, the
  usual alignment slack). Larger unallocated regions — the stale tail after the last
  partition of a disk that was re-partitioned smaller, say — are ``unused`` (neither read
  nor stored; a restore makes them zeros or holes) unless ``keep_unpartitioned``; the
  item's note says which.
- ``disk/whole``: a disk without a partition table (a bare filesystem), source ``disk``

The archive metadata ``disk`` describes the disk (identity, size, sector size, table
label and id, partitions, table regions), so ``disk restore`` can check a target and
rebuild the table for a larger disk without reading any content.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field

from ..blockmap.base import BlockMap
from ..errors import DiskError, SourceError
from ..repository.repo import Repository
from ..source.content import SeekableContent
from ..source.disks import Inventory
from ..source.partitions import (
    PartitionTable,
    Segment,
    device_sector_size,
    layout,
    parse_table,
)
from ..source.paths import FILE, filesystem_map, mounted_note, writable_mounts
from ..source.qemu import ImageExport, guest_format
from ..source.reader import FileRangeReader
from .create import ArchiveBuilder, CreateOptions, CreateStats, refuse_taken_name
from .model import Item

DISK_FORMAT = 1  # version of the "disk" metadata and of the item layout above
ITEM_MODE = 0o100600  # disk contents are as private as the disk
# gaps up to this size are stored even after the first partition: alignment slack where
# boot loaders (GRUB's core.img on MBR disks, vendor tools) may live; larger ones are
# unallocated space, whose old contents are usually only stale data
KEEP_GAP = 1 << 20
UNPARTITIONED_UNUSED = ("unpartitioned space: not stored, restored as zeros "
                        "(--keep-unpartitioned stores it)")
UNPARTITIONED_KEPT = "unpartitioned space: stored (--keep-unpartitioned)"


@dataclass
class DiskSource:
    """An open whole disk: a block device or a disk image file."""

    path: str
    fd: int
    size: int
    is_device: bool
    sector_size: int | None  # known for devices; images: found from the table
    identity: dict = field(default_factory=dict)  # serial, model, wwid (devices)
    export: ImageExport | None = None  # a VM image read through QEMU (its guest disk)

    @classmethod
    def open(cls, path: str, image_format: str | None = None) -> DiskSource:
        """Open a device or an image; a VM image (qcow2, vmdk, ...) is opened as the
        guest sees its disk (``image_format`` forces a format; "raw" reads the file's
        own bytes)."""
        fmt = guest_format(path, image_format)
        if fmt is None:
            return cls._open(path, path)
        export = ImageExport(path, fmt).start()
        try:
            src = cls._open(export.path, path)
        except BaseException:
            export.close()
            raise
        src.export = export
        src.identity = {"image_format": fmt, "image": os.path.abspath(path)}
        return src

    @classmethod
    def _open(cls, read_path: str, path: str) -> DiskSource:
        try:
            fd = os.open(read_path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{path}: cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            is_dev = stat.S_ISBLK(st.st_mode)
            if not (is_dev or stat.S_ISREG(st.st_mode)):
                raise SourceError(f"{path} is neither a block device nor a disk image file")
            size = os.lseek(fd, 0, os.SEEK_END)
            if size == 0:
                raise SourceError(f"{path} is empty")
            ss = _sector_size(fd) if is_dev else None
            with contextlib.suppress(OSError):  # a hint: partitions are read in disk order
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            identity = _device_identity(st.st_rdev) if is_dev else {}
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, is_dev, ss, identity)

    def reader(self, start: int = 0, size: int | None = None) -> FileRangeReader:
        return FileRangeReader(self.fd, start, self.size - start if size is None else size)

    def read_table(self) -> PartitionTable:
        """The partition table; a damaged or truncated one is an error, never a guess."""
        try:
            return parse_table(self.reader(), self.sector_size)
        except DiskError as e:
            raise DiskError(f"{self.path}: partition table: {e}") from None

    def close(self) -> None:
        os.close(self.fd)
        if self.export is not None:
            self.export.close()


def _sector_size(fd: int) -> int | None:
    try:
        return device_sector_size(fd)
    except OSError:
        return None


def _device_identity(rdev: int) -> dict:
    """Serial, model and WWID of a block device from sysfs, if the inventory knows it."""
    want = (os.major(rdev), os.minor(rdev))
    for d in Inventory().disks(probe=False):
        if (d.major, d.minor) == want:
            return {"serial": d.serial, "model": d.model, "wwid": d.wwid, "name": d.name,
                    "backing_file": d.backing_file}
    return {}


@dataclass
class PlannedItem:
    item: Item
    content: SeekableContent


@dataclass
class DiskPlan:
    source: DiskSource
    table: PartitionTable
    items: list[PlannedItem]
    warnings: list[str]
    keep_unpartitioned: bool = False

    def disk_meta(self) -> dict:
        t, src = self.table, self.source
        fs = {p.item.partition: p.item.fs for p in self.items if p.item.partition is not None}
        parts = [{"number": p.number, "start": p.start, "size": p.size, "type": p.type_id,
                  "type_name": p.type_name, "uuid": p.uuid, "name": p.name, "kind": p.kind,
                  "bootable": p.bootable, "attrs": p.attrs, "fs": fs.get(p.number)}
                 for p in sorted(t.partitions, key=lambda p: p.number)]
        return {
            "format": DISK_FORMAT, "path": src.path,
            "kind": "blockdev" if src.is_device else "image",
            **{k: v for k, v in src.identity.items() if v is not None},
            "size": src.size, "sector_size": t.sector_size, "label": t.label,
            "disk_id": t.disk_id, "partitions": parts,
            "regions": [{"what": r.what, "start": r.start, "size": r.size} for r in t.regions],
            "notes": list(t.notes), "keep_unpartitioned": self.keep_unpartitioned,
        }


def segment_path(seg: Segment, sector_size: int) -> str:
    if seg.kind == "partition":
        return f"disk/part{seg.number}"
    if seg.kind == "table":
        return f"disk/table-{seg.what}" + (
            f"-{seg.start // sector_size}" if seg.what == "ebr" else "")
    return f"disk/gap-{seg.start}"


def plan_backup(src: DiskSource, skip_unused: bool = True,
                keep_unpartitioned: bool = False) -> DiskPlan:
    """Read the table and every partition's block map; decide what each item reads.

    Nothing of the content is read yet: the plan is cheap, and a bad table fails here.
    ``keep_unpartitioned``: store large unallocated gaps too (see the module head).
    """
    table = src.read_table()
    segments = [Segment("whole", 0, src.size)] if table.label is None else layout(table)
    mapped = [s for s in segments if s.kind in ("partition", "whole")]
    mounts = dict(zip([(s.start, s.size) for s in mapped],
                      writable_mounts(src.path, [(s.start, s.size) for s in mapped]),
                      strict=True))
    items, warnings = [], []
    first_part = min((s.start for s in segments if s.kind == "partition"), default=src.size)
    for seg in segments:
        in_use = mounts.get((seg.start, seg.size))
        planned = _plan_segment(src, table, seg, skip_unused, in_use)
        if seg.kind == "gap" and seg.start >= first_part and seg.size > KEEP_GAP:
            if keep_unpartitioned:
                planned.item.note = UNPARTITIONED_KEPT
            else:
                planned.item.note = UNPARTITIONED_UNUSED
                planned.content.blockmap = BlockMap.nothing_used(seg.size, "unpartitioned")
        if in_use:
            warnings.append(f"{src.path}: {planned.item.path} is {planned.item.note} "
                            "(back up a snapshot or an unmounted disk for a consistent copy)")
        items.append(planned)
    return DiskPlan(src, table, items, warnings, keep_unpartitioned)


def _plan_segment(src: DiskSource, table: PartitionTable, seg: Segment, skip_unused: bool,
                  mounts: list[str] | None) -> PlannedItem:
    source = {"whole": "disk"}.get(seg.kind, seg.kind)
    path = "disk/whole" if seg.kind == "whole" else segment_path(seg, table.sector_size)
    item = Item(path=path, type=FILE, mode=ITEM_MODE, size=seg.size, source=source,
                disk_offset=seg.start, partition=seg.number)
    content = SeekableContent(src.fd, seg.size, start=seg.start, what=f"{src.path} ({path})",
                              holes=not src.is_device)
    if seg.kind in ("partition", "whole"):
        bmap, item.fs, item.note = filesystem_map(src.fd, seg.start, seg.size)
        if mounts:
            bmap, item.note = None, mounted_note(mounts)
        elif not skip_unused:
            bmap, item.note = None, "--no-skip-unused: all blocks read"
        content.blockmap = bmap
    return PlannedItem(item, content)


@dataclass
class DiskBackupResult:
    meta: dict
    stats: CreateStats
    items: list[Item]
    warnings: list[str]


def backup_disk(repo: Repository, name: str, plan: DiskPlan, opts: CreateOptions,
                extra: dict | None = None) -> DiskBackupResult:
    """Store every planned item in disk order and commit the archive (unless dry-run);
    ``extra``: more archive metadata (``vm``)."""
    refuse_taken_name(repo, name)
    b = ArchiveBuilder(repo, opts)
    b.total = plan.source.size
    try:
        for p in plan.items:
            before_stored, before_plain = b.stats.new_stored, b.stats.new_plain
            item = b.add(p.item, p.content)
            # per-item share of what this archive added to the repository: info shows it
            assert item.stats is not None
            item.stats["stored"] = b.stats.new_stored - before_stored
            item.stats["new"] = b.stats.new_plain - before_plain
        meta = b.commit(name, {"disk": plan.disk_meta(), **(extra or {})})
    finally:
        b.close()
    return DiskBackupResult(meta, b.stats, [p.item for p in plan.items], plan.warnings)
