"""Restoring a whole-disk archive onto a disk or image, or one partition of it.

Order of work: load the archive's disk description and check that its items tile the
disk; inspect the target (size, mounts, what it holds); refuse before writing a byte if
anything is wrong; only then write. Zero and unused extents (and all-zero 64 KiB blocks)
become holes in an image file — a new one has them already, in an existing one they are
punched, so a sparse image stays sparse — and zeros (BLKZEROOUT) on a device. With a
``damage`` list (``--continue-on-error``), unreadable chunks become zeros and are listed.
A larger GPT target gets its backup GPT moved to its new end (``relocate_backup_gpt``);
the old backup location is zeroed, so no stale second GPT header remains in the middle of the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ..blockmap.probe import detect_fs
from ..errors import ArchiveError, ArchiveIncomplete, DiskError, IntegrityError, TargetError
from ..repository.repo import Repository
from ..source.content import DATA, UNUSED, ZERO
from ..source.disks import is_mounted
from ..source.partitions import (
    PartitionTable,
    device_sector_size,
    parse_table,
    relocate_backup_gpt,
)
from ..source.reader import FileRangeReader
from .extract import Damage, FileSink, _pwrite_all, iter_pieces
from .model import DELTA, Item
from .view import ArchiveView

BLKRRPART = 0x125F  # _IO(0x12, 95): ask the kernel to re-read the partition table
STALE_TAIL = 1 << 20  # zeroed at the end of a larger non-GPT target (old backup GPTs)


@dataclass
class DiskArchive:
    """A disk archive's description and its items in disk order (validated tiling)."""

    name: str
    disk: dict
    items: list[Item]

    @classmethod
    def from_view(cls, view: ArchiveView) -> DiskArchive:
        disk = view.meta.get("disk")
        if not isinstance(disk, dict) or not isinstance(disk.get("size"), int):
            raise ArchiveError(f"archive {view.name!r} is not a disk archive "
                               "(made by `diskvault disk backup`)")
        if view.loss:  # the items left cannot tile the disk: say why, not where
            raise ArchiveIncomplete(view.loss, "the disk cannot be restored from it")
        items = sorted((i for i in view.items if i.disk_offset is not None
                        and i.extents is not None), key=lambda i: i.disk_offset or 0)
        pos = 0
        for i in items:
            assert i.extents is not None
            if i.disk_offset != pos or i.extents.total() != i.size:
                raise IntegrityError(f"archive {view.name!r}: item {i.path} does not continue "
                                     f"the disk at byte {pos}")
            pos += i.size
        if pos != disk["size"]:
            raise IntegrityError(f"archive {view.name!r}: items cover {pos} bytes of a "
                                 f"{disk['size']}-byte disk")
        return cls(view.name, disk, items)

    @property
    def size(self) -> int:
        return int(self.disk["size"])

    def partition_item(self, number: int) -> Item:
        for i in self.items:
            if i.partition == number:
                return i
        have = ", ".join(str(i.partition) for i in self.items if i.partition is not None)
        raise ArchiveError(f"archive {self.name!r} has no partition {number} "
                           f"(partitions: {have or 'none'})")

    def table(self, repo: Repository) -> PartitionTable | None:
        """The partition table as backed up, re-parsed from the archive's table items."""
        if not self.disk.get("label"):
            return None
        regions: list[tuple[int, bytes]] = []
        table_items = [i for i in self.items if i.source == "table"]
        for piece in iter_pieces(repo, table_items):
            data = piece.data if piece.data is not None else bytes(piece.length)
            regions.append(((piece.item.disk_offset or 0) + piece.offset, data))
        table = parse_table(_BytesReader(self.size, regions), self.disk.get("sector_size"))
        want = sorted((p["number"], p["start"], p["size"]) for p in self.disk["partitions"])
        if sorted((p.number, p.start, p.size) for p in table.partitions) != want:
            raise IntegrityError(f"archive {self.name!r}: its table items disagree with its "
                                 "partition list")
        return table


class _BytesReader:
    """A disk of ``size`` bytes that holds ``regions`` and zeros everywhere else."""

    def __init__(self, size: int, regions: list[tuple[int, bytes]]) -> None:
        self.size = size
        self.regions = regions

    def pread(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        out = bytearray(size)
        for start, data in self.regions:
            a, z = max(offset, start), min(offset + size, start + len(data))
            if a < z:
                out[a - offset : z - offset] = data[a - start : z - start]
        return bytes(out)


# --- the target -------------------------------------------------------------------


@dataclass
class TargetInfo:
    path: str
    exists: bool
    is_device: bool = False
    size: int = 0
    sector_size: int | None = None
    table: PartitionTable | None = None  # None: no partition table found
    table_error: str | None = None  # a table is there but cannot be read
    fs: str | None = None  # a filesystem on the whole target

    @property
    def kind(self) -> str:
        if not self.exists:
            return "new image file"
        return "block device" if self.is_device else "image file"


def inspect_target(path: str) -> TargetInfo:
    """What the target is and holds; reads a few sectors, writes nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return TargetInfo(path, exists=False)
    except OSError as e:
        raise TargetError(f"{path}: {e.strerror}") from None
    is_dev = stat.S_ISBLK(st.st_mode)
    if not (is_dev or stat.S_ISREG(st.st_mode)):
        raise TargetError(f"{path} is neither a block device nor an image file")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TargetError(f"{path}: cannot open: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        info = TargetInfo(path, True, is_dev, size)
        if is_dev:
            with contextlib.suppress(OSError):
                info.sector_size = device_sector_size(fd)
        reader = FileRangeReader(fd, 0, size)
        if size:
            try:
                table = parse_table(reader, info.sector_size)
            except DiskError as e:
                info.table_error = str(e)
            else:
                info.table = table if table.label else None
            if info.table is None and info.table_error is None:
                info.fs = detect_fs(reader)
        return info
    finally:
        os.close(fd)


# --- the plan -----------------------------------------------------------------------


@dataclass
class Region:
    """One archive item placed on the target."""

    item: Item
    offset: int  # where on the target
    write: bool = True  # False: not written at all (an old backup-GPT location)


@dataclass
class RestorePlan:
    archive: DiskArchive
    target: TargetInfo
    partition: int | None
    size: int  # bytes the restore needs
    regions: list[Region]
    gpt_writes: list[tuple[int, bytes]] = field(default_factory=list)
    zero_ranges: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, n, why)

    @property
    def create(self) -> bool:
        return not self.target.exists

    @property
    def final_size(self) -> int:
        return self.target.size if self.target.exists else self.size


def plan_restore(repo: Repository, arch: DiskArchive, target_path: str,
                 partition: int | None = None, force: bool = False) -> RestorePlan:
    """Inspect the target and decide every write; raise TargetError if it must not be."""
    target = inspect_target(target_path)
    if partition is not None:
        item = arch.partition_item(partition)
        plan = RestorePlan(arch, target, partition, item.size, [Region(item, 0)])
    else:
        plan = RestorePlan(arch, target, None, arch.size,
                           [Region(i, i.disk_offset or 0) for i in arch.items])
    check_target(plan, force)
    if partition is None and plan.final_size > arch.size:
        _plan_larger_disk(repo, plan)
    return plan


def _plan_larger_disk(repo: Repository, plan: RestorePlan) -> None:
    arch, size = plan.archive, plan.final_size
    if arch.disk.get("label") == "gpt":
        table = arch.table(repo)
        assert table is not None
        plan.gpt_writes = relocate_backup_gpt(table, size)
        for r in plan.regions:
            if r.item.path.startswith("disk/table-gpt-backup"):
                r.write = False  # written at the new end instead
                if not plan.create:
                    plan.zero_ranges.append((r.offset, r.item.size, "old backup GPT location"))
    elif not plan.create:
        # an earlier GPT's backup header at the end would make tools see a second table
        n = min(STALE_TAIL, size - arch.size)
        plan.zero_ranges.append((size - n, n, "end of the target (stale backup GPT)"))


def check_target(plan: RestorePlan, force: bool) -> None:
    """Refuse a target that is in use, too small, or holds something else (unless force)."""
    t, need = plan.target, plan.size
    if not t.exists:
        return
    if is_mounted(t.path):
        raise TargetError(f"{t.path} is in use (mounted or swap): refusing to write to it")
    if t.size < need:
        raise TargetError(f"{t.path} is too small: {t.size} bytes, the "
                          f"{'partition' if plan.partition is not None else 'disk'} needs "
                          f"{need}")
    ss = plan.archive.disk.get("sector_size")
    if plan.partition is None and t.sector_size and plan.archive.disk.get("label") \
            and ss != t.sector_size:
        raise TargetError(f"{t.path} has {t.sector_size}-byte sectors, the disk had {ss}: "
                          "its partition table would not be found there")
    if force:
        return
    why = _occupied(plan)
    if why:
        raise TargetError(f"{t.path} {why}; --force overwrites it")


def _occupied(plan: RestorePlan) -> str | None:
    """Why writing to the target could destroy something, or None."""
    t, disk = plan.target, plan.archive.disk
    if t.table_error:
        return f"holds a damaged partition table ({t.table_error})"
    if t.table is not None:
        if plan.partition is not None:
            return (f"carries a partition table ({t.table.label}, id {t.table.disk_id}): "
                    "a whole disk, not a partition")
        if (t.table.label, t.table.disk_id) != (disk.get("label"), disk.get("disk_id")):
            return (f"carries another disk's partition table ({t.table.label}, id "
                    f"{t.table.disk_id}; the archive's disk: {disk.get('label')}, id "
                    f"{disk.get('disk_id')})")
    if t.fs:
        return f"holds a {t.fs} filesystem"
    return None


# --- describing and executing ----------------------------------------------------------


def _kinds(item: Item) -> dict[int, int]:
    out = {DATA: 0, ZERO: 0, UNUSED: 0}
    assert item.extents is not None
    for kind, n, _ in item.extents:
        kind = DATA if kind == DELTA else kind  # a delta restores as data
        out[kind] = out.get(kind, 0) + n
    return out


def describe(plan: RestorePlan, fmt: Callable[[int], str]) -> list[str]:
    """The plan as lines of text (``disk restore --dry-run``)."""
    t = plan.target
    what = f"partition {plan.partition}" if plan.partition is not None else "the disk"
    blank = "holes" if plan.create else ("zeroed (BLKZEROOUT)" if t.is_device
                                         else "holes (punched)")
    lines = [f"Restore {what} of {plan.archive.name} ({fmt(plan.size)}) onto {t.path} "
             f"({t.kind}, {fmt(plan.final_size)})",
             f"{'OFFSET':>14}  {'SIZE':>10}  {'ITEM':<28} CONTENT"]
    for r in plan.regions:
        k = _kinds(r.item)
        label = r.item.path + (f" ({r.item.fs})" if r.item.fs else "")
        if not r.write:
            content = "not written here (moved to the end of the target)"
        else:
            content = f"data {fmt(k[DATA])}"
            if k[ZERO] or k[UNUSED]:
                content += f", zero {fmt(k[ZERO])}, unused {fmt(k[UNUSED])}: {blank}"
        lines.append(f"{r.offset:>14}  {fmt(r.item.size):>10}  {label:<28} {content}")
    for off, n, why in plan.zero_ranges:
        lines.append(f"{off:>14}  {fmt(n):>10}  {'(zeroed)':<28} {why}")
    if plan.gpt_writes:
        lines.append(f"then: the GPT is adapted to the target size: backup GPT moved to its "
                     f"end ({len(plan.gpt_writes)} writes)")
    return lines


@dataclass
class RestoreResult:
    written: int = 0  # data bytes written
    blank: int = 0  # zero/unused bytes made holes or zeros


def execute(repo: Repository, plan: RestorePlan, workers: int = 2,
            progress: Callable[[int, int], None] | None = None,
            damage: list[Damage] | None = None) -> RestoreResult:
    """Write the plan; a new image file that fails halfway is removed again. With a
    ``damage`` list, unreadable chunks are written as zeros and recorded there."""
    t = plan.target
    try:
        if plan.create:
            fd = os.open(t.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, plan.size)  # all holes: zero runs need no writing
        else:
            fd = os.open(t.path, os.O_WRONLY)
    except OSError as e:
        raise TargetError(f"{t.path}: cannot open for writing: {e.strerror}") from None
    ok = False
    try:
        result = _write_plan(repo, plan, fd, workers, progress, damage)
        os.fsync(fd)
        if t.is_device:
            with contextlib.suppress(OSError):  # loop devices without partscan refuse
                fcntl.ioctl(fd, BLKRRPART)
        ok = True
        return result
    except OSError as e:
        raise TargetError(f"{t.path}: {e.strerror}") from None
    finally:
        os.close(fd)
        if plan.create and not ok:
            with contextlib.suppress(OSError):
                os.unlink(t.path)


def _write_plan(repo: Repository, plan: RestorePlan, fd: int, workers: int,
                progress: Callable[[int, int], None] | None,
                damage: list[Damage] | None) -> RestoreResult:
    path, result = plan.target.path, RestoreResult()
    todo = [r for r in plan.regions if r.write]
    sinks = {id(r.item): FileSink(fd, path, sparse=True, base=r.offset, fresh=plan.create)
             for r in todo}
    total, done = sum(r.item.size for r in todo), 0
    for piece in iter_pieces(repo, [r.item for r in todo], workers, damage=damage):
        sinks[id(piece.item)].write(piece)
        if piece.data is None:
            result.blank += piece.length
        else:
            result.written += piece.length
        done += piece.length
        if progress:
            progress(done, total)
    zeroer = FileSink(fd, path, sparse=True, fresh=False)  # holes in a file, zeros on a device
    for off, n, _ in plan.zero_ranges:
        zeroer.blank(off, n)
    for off, data in plan.gpt_writes:
        _pwrite_all(fd, data, off, path)
    return result
