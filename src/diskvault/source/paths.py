"""Turn command-line sources into items with content: paths, ``-`` (stdin), a command.

Paths are stored without their leading ``/`` (``/dev/loop3`` → ``dev/loop3``), in the
order given; directories recursively in sorted order. With ``read_special``, block
devices are read as seekable content and character devices/FIFOs as streams.
"""

from __future__ import annotations

import grp
import os
import pwd
import select
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..blockmap.base import BlockMap
from ..errors import DiskvaultError, SourceError
from .content import Content, SeekableContent, StreamContent
from .reader import FileRangeReader


@dataclass
class SourceOptions:
    read_special: bool = False
    read_special_timeout: float = 300.0
    one_file_system: bool = False
    xattrs: bool = True
    skip_unused: bool = False  # apply a filesystem's block map to seekable items


# entry types (what is restored); archive/model.py uses the same names
FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
BLOCKDEV, CHARDEV, FIFO = "blockdev", "chardev", "fifo"


@dataclass
class Meta:
    """Metadata of one entry as read from its source (archive.model.Item extends it)."""

    path: str
    type: str = FILE
    mode: int = 0o100644
    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    group: str | None = None
    mtime: int | None = None
    atime: int | None = None
    ctime: int | None = None
    size: int = 0
    target: str | None = None
    rdev: int | None = None
    xattrs: dict[bytes, bytes] | None = None
    source: str | None = None
    fs: str | None = None  # filesystem found on the content (--skip-unused)
    note: str | None = None  # why its block map was not applied, if it was not


@dataclass
class Source:
    item: Meta
    content: Content | None = None
    close: Callable[[], None] | None = None
    warning: str | None = None  # what the user should hear now (the CLI prints it)


def archive_path(path: str) -> str:
    """``/dev/loop3`` → ``dev/loop3``; ``../x`` → ``x`` (like Borg: never above the root)."""
    p = os.path.normpath(path).lstrip("/")
    while p == ".." or p.startswith("../"):
        p = p[3:]
    return p or "."


def _names(uid: int, gid: int) -> tuple[str | None, str | None]:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = None
    return user, group


def _xattrs(path: str) -> dict[bytes, bytes] | None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return None
    out = {}
    for n in names:
        try:
            out[n.encode()] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out or None


def item_from_stat(path: str, st: os.stat_result, opts: SourceOptions) -> Meta:
    user, group = _names(st.st_uid, st.st_gid)
    return Meta(
        path=archive_path(path), mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
        user=user, group=group, mtime=st.st_mtime_ns, atime=st.st_atime_ns,
        ctime=st.st_ctime_ns, xattrs=_xattrs(path) if opts.xattrs else None,
    )


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def open_fifo(path: str, timeout: float) -> int:
    """Open a FIFO for reading, failing cleanly if no writer shows up within ``timeout``.

    Opened non-blocking (which never waits for a writer), then poll: Linux reports
    POLLIN/POLLHUP only once a writer has connected, so a poll timeout means no writer.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    if not p.poll(max(0, int(timeout * 1000))):
        os.close(fd)
        raise SourceError(f"{path}: no writer connected to the FIFO within {timeout:g} s "
                          "(--read-special-timeout)")
    os.set_blocking(fd, True)
    return fd


def _fd_reader(fd: int) -> Callable[[int], bytes]:
    return lambda n: os.read(fd, n)


def walk(paths: list[str], opts: SourceOptions) -> Iterator[Source]:
    hardlinks: dict[tuple[int, int], str] = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise SourceError(f"{p}: no such file or directory") from None
        except OSError as e:
            raise SourceError(f"{p}: {e.strerror}") from None
        warning = None if opts.read_special else _only_the_node(p, st)
        for src in _walk_one(p, st, opts, hardlinks, root_dev=st.st_dev):
            src.warning, warning = src.warning or warning, None
            yield src


_SPECIAL = {stat.S_IFBLK: "block device", stat.S_IFCHR: "character device",
            stat.S_IFIFO: "FIFO"}


def _only_the_node(path: str, st: os.stat_result) -> str | None:
    """A named device, FIFO or symlink to one is stored as a node without
    --read-special, like Borg does; users who name /dev/sda expect its content."""
    link = stat.S_ISLNK(st.st_mode)
    if link:
        try:
            st = os.stat(path)
        except OSError:
            return None
    kind = _SPECIAL.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    return (f"{path} is {'a symlink to ' if link else ''}a {kind}: only the "
            f"{'symlink' if link else 'node'} was stored, not the content "
            "(--read-special reads the content"
            + ("; 'disk backup' backs up a whole disk)" if kind == "block device" else ")"))


def _walk_one(path: str, st: os.stat_result, opts: SourceOptions,
              hardlinks: dict[tuple[int, int], str], root_dev: int) -> Iterator[Source]:
    mode = st.st_mode
    item = item_from_stat(path, st, opts)
    if stat.S_ISDIR(mode):
        item.type = DIR
        yield Source(item)
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise SourceError(f"{path}: cannot list directory: {e.strerror}") from None
        for n in names:
            child = os.path.join(path, n)
            try:
                cst = os.lstat(child)
            except FileNotFoundError:
                continue  # vanished while we walked
            if opts.one_file_system and cst.st_dev != root_dev and stat.S_ISDIR(cst.st_mode):
                continue
            yield from _walk_one(child, cst, opts, hardlinks, root_dev)
        return
    if stat.S_ISLNK(mode):
        if opts.read_special:
            # like Borg: --read-special follows symlinks to devices and FIFOs
            # (/dev/disk/by-id/… names are symlinks)
            try:
                target = os.stat(path)
            except OSError:
                target = None
            if target is not None and (stat.S_ISBLK(target.st_mode)
                                       or stat.S_ISCHR(target.st_mode)
                                       or stat.S_ISFIFO(target.st_mode)):
                yield from _walk_one(path, target, opts, hardlinks, root_dev)
                return
        item.type, item.target = SYMLINK, os.readlink(path)
        yield Source(item)
        return
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        if key in hardlinks:
            item.type, item.target = HARDLINK, hardlinks[key]
            yield Source(item)
            return
        hardlinks[key] = item.path
    if stat.S_ISREG(mode) or (opts.read_special and stat.S_ISBLK(mode)):
        yield _open_seekable(path, item, stat.S_ISBLK(mode), opts.skip_unused)
        return
    if opts.read_special and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        fifo = stat.S_ISFIFO(mode)
        try:
            fd = open_fifo(path, opts.read_special_timeout) if fifo else os.open(path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"{path}: cannot open: {e.strerror}") from None
        item.type, item.source = FILE, FIFO if fifo else CHARDEV
        item.mode = stat.S_IFREG | stat.S_IMODE(mode)
        yield Source(item, StreamContent(_fd_reader(fd), what=path), lambda: os.close(fd))
        return
    # special files without --read-special: metadata only, like Borg
    item.type = {stat.S_IFBLK: BLOCKDEV, stat.S_IFCHR: CHARDEV, stat.S_IFIFO: FIFO}.get(
        stat.S_IFMT(mode), "other")
    if item.type == "other":
        return  # sockets: nothing to back up
    item.rdev = st.st_rdev
    yield Source(item)


def _open_seekable(path: str, item: Meta, is_block: bool, skip_unused: bool = False
                   ) -> Source:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SourceError(f"{path}: cannot open: {e.strerror}") from None
    size = device_size(fd) if is_block else os.fstat(fd).st_size
    item.type, item.size = FILE, size
    item.source = BLOCKDEV if is_block else FILE
    if is_block:
        item.mode = stat.S_IFREG | stat.S_IMODE(item.mode)
    try:  # a hint only: we read in order, the kernel may read ahead
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass
    content = SeekableContent(fd, size, what=path, holes=not is_block)
    warning = None
    if skip_unused and size >= MIN_FS_SIZE:
        content.blockmap, item.fs, item.note = filesystem_map(fd, 0, size)
        if content.blockmap is not None and (mounts := writable_mounts(path, [(0, size)])[0]):
            content.blockmap = None
            item.note = mounted_note(mounts)
        elif item.fs is None and (label := _partition_label(fd, size, is_block)):
            item.note = f"holds a {label} partition table, not a filesystem: all blocks read"
            warning = (f"{path} holds a {label} partition table: --skip-unused only skips "
                       "the free space of a filesystem, so every block was read; "
                       "'diskvault disk backup' skips the free space of each partition")
    return Source(item, content, lambda: os.close(fd), warning)


def _partition_label(fd: int, size: int, is_block: bool) -> str | None:
    """"GPT" or "MBR" if the content is a partitioned disk, else None."""
    from .partitions import device_sector_size, parse_table

    try:
        ss = device_sector_size(fd) if is_block else None
        label = parse_table(FileRangeReader(fd, 0, size), ss).label
    except (DiskvaultError, OSError):
        return None  # a damaged table: no advice is better than a wrong one
    return {"gpt": "GPT", "dos": "MBR"}.get(label or "")


# smaller files hold no filesystem worth a block map: not even probed (a tree of small
# files would otherwise cost ~10 reads per file)
MIN_FS_SIZE = 64 << 10


def filesystem_map(fd: int, start: int, size: int) -> tuple[BlockMap | None, str | None,
                                                            str | None]:
    """(block map worth applying or None, filesystem type, note) of a byte range.

    A map that marks everything used is dropped: it would only cost bitmap lookups.
    """
    from ..blockmap.probe import block_map_for  # parsers load only when maps are wanted

    try:
        bmap = block_map_for(FileRangeReader(fd, start, size))
    except OSError as e:  # reading the content will report the error where it matters
        return None, None, f"filesystem not probed ({e.strerror}): all blocks read"
    fs = None if bmap.fs_type == "unknown" else bmap.fs_type
    return (None if bmap.is_all_used else bmap), fs, bmap.note or None


def writable_mounts(path: str, ranges: list[tuple[int, int]]) -> list[list[str]]:
    """For each byte range ``(start, size)`` of a device or image: where it is in use.

    Read-write mounts and active swap count; a read-only mount does not change blocks,
    so its block map stays trustworthy. A live read-write filesystem allocates blocks
    after its bitmaps were read: skipping "free" blocks could then drop new data that
    a plain read would have caught, so callers read such ranges whole.
    """
    from .disks import Inventory  # sysfs and mountinfo: only read when a map is applied

    inv = Inventory()
    in_use = inv.in_use()
    base = inv.extents_of_path(path)
    out = []
    for start, size in ranges:
        ext = [(b, s + start, min(e, s + start + size)) for b, s, e in base]
        out.append([m for m in inv.mounts_overlapping(ext, in_use) if not _read_only(m)])
    return out


def _read_only(mountpoint: str) -> bool:
    if mountpoint == "[SWAP]":
        return False
    from .fsfreeze import frozen_by_us

    if frozen_by_us(mountpoint):  # --fsfreeze: nothing changes while we read
        return True
    try:
        return bool(os.statvfs(mountpoint).f_flag & os.ST_RDONLY)
    except OSError:
        return False  # not visible from here: assume the worst


def mounted_note(mounts: list[str]) -> str:
    return (f"in use read-write ({', '.join(mounts)}): all blocks read, and they may "
            "change while being read")


def stdin_source(name: str, mode: int, user: str | None = None, group: str | None = None
                 ) -> Source:
    import sys
    import time

    fd = sys.stdin.buffer.fileno()
    now = time.time_ns()
    item = Meta(path=name, type=FILE, mode=stat.S_IFREG | mode, uid=os.getuid(), gid=os.getgid(),
                user=user or _names(os.getuid(), os.getgid())[0],
                group=group or _names(os.getuid(), os.getgid())[1],
                mtime=now, atime=now, ctime=now, source="stdin")
    return Source(item, StreamContent(_fd_reader(fd), what="stdin"))


class CommandSource:
    """Content from a command's stdout; a non-zero exit fails the archive."""

    def __init__(self, argv: list[str], name: str, mode: int) -> None:
        self.argv = argv
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        except OSError as e:
            raise SourceError(f"cannot run {argv[0]}: {e.strerror}") from None
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        src = stdin_source(name, mode)
        src.item.source = "command"
        self.source = Source(src.item, StreamContent(_fd_reader(fd), what=argv[0]), self.finish)

    def finish(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        rc = self.proc.wait()
        if rc != 0:
            raise SourceError(f"command {' '.join(self.argv)} failed with exit code {rc}")
