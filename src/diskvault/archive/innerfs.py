"""What an item's ``ITEM.files/`` tree holds: a filesystem, or one per partition.

An item holding a filesystem probe.py recognises gets a tree: The Sleuth Kit reads it in
userland (``fstree.FsTree``: ext2/3/4, NTFS, FAT); XFS and btrfs, which TSK cannot read,
are marked for a read-only kernel mount (only root can; without root the tree is absent
and ``note`` says why). An item with a partition table (a disk image) gets one entry per
partition, each inspected the same way. Nothing is read before someone looks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..blockmap.probe import detect_fs
from ..errors import DiskvaultError
from ..source.partitions import parse_table
from .fstree import ByteSource, FsTree, FsUnreadable

TSK, KERNEL, PARTS = "tsk", "kernel", "parts"
# how the kernel mounts each type read-only without replaying a journal (never a write)
KERNEL_MOUNT_OPTIONS = {"xfs": "ro,norecovery", "btrfs": "ro,rescue=nologreplay",
                        "ext2": "ro", "ext3": "ro,noload", "ext4": "ro,noload"}
MIN_FS_BYTES = 64 << 10  # smaller items are never probed: no filesystem fits


class SliceReader:
    """Bytes ``start .. start+size`` of another source (a partition of an image item)."""

    def __init__(self, src: ByteSource, start: int, size: int) -> None:
        self.src, self.start, self.size = src, start, size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return b""
        return self.src.read(self.start + offset, min(length, self.size - offset))


class _PRead:
    """The ``pread`` face probe.py and partitions.py read through."""

    def __init__(self, src: ByteSource) -> None:
        self.src, self.size = src, src.size

    def pread(self, offset: int, size: int) -> bytes:
        return self.src.read(offset, size)


@dataclass
class Inner:
    kind: str  # TSK, KERNEL or PARTS
    fs_type: str | None
    offset: int  # where the filesystem starts in the item (a partition of an image)
    size: int
    tree: FsTree | None = None
    parts: dict[str, Inner] = field(default_factory=dict)  # PARTS: "part1" → its fs
    note: str | None = None


def inspect(src: ByteSource, fs_hint: str | None = None, offset: int = 0,
            tables: bool = True) -> tuple[Inner | None, str | None]:
    """(what ``ITEM.files`` shows, or None; a note for the user, or None)."""
    if src.size < MIN_FS_BYTES:
        return None, None
    try:
        fs_type = fs_hint or detect_fs(_PRead(src))
        if fs_type is None and tables:
            return _partitions(src)
    except DiskvaultError as e:  # a damaged range where the superblock is: no tree
        return None, f"cannot look inside: {e}"
    if fs_type is None or not (FsTree.can_read(fs_type) or fs_type in KERNEL_MOUNT_OPTIONS):
        return None, None  # swap, LVM, LUKS…: no files to show
    if FsTree.can_read(fs_type):
        try:
            return Inner(TSK, fs_type, offset, src.size, tree=FsTree(src, fs_type)), None
        except FsUnreadable as e:
            why = f"The Sleuth Kit cannot read this {fs_type} ({e})"
    else:
        why = f"The Sleuth Kit does not read {fs_type}"
    if fs_type not in KERNEL_MOUNT_OPTIONS:
        return None, f"{why}: no file tree"
    if os.geteuid() != 0:
        return None, f"{why}, and a read-only kernel mount needs root: no file tree"
    return Inner(KERNEL, fs_type, offset, src.size), f"{why}: read-only kernel mount"


def _partitions(src: ByteSource) -> tuple[Inner | None, str | None]:
    table = parse_table(_PRead(src))
    if table.label is None:
        return None, None
    parts: dict[str, Inner] = {}
    notes = []
    for p in table.data_partitions:
        inner, note = inspect(SliceReader(src, p.start, p.size), offset=p.start, tables=False)
        if inner is not None:
            parts[f"part{p.number}"] = inner
        if note:
            notes.append(f"part{p.number}: {note}")
    if not parts:
        return None, "; ".join(notes) or None
    return Inner(PARTS, None, 0, src.size, parts=parts), "; ".join(notes) or None
