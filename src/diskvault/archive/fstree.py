"""Files inside a filesystem image, read in userland with The Sleuth Kit (``pytsk3``).

No filesystem parser of our own: TSK reads ext2/3/4, NTFS and FAT (not XFS or btrfs —
``FsUnreadable`` then, and the caller may fall back to a kernel mount). The image is any
object with ``read(offset, length)`` and ``size`` (an archive item's reader), adapted
as a TSK "external" image, so no root, loop device or kernel module is needed.

TSK handles are not thread-safe: every call into one filesystem holds its lock.
Only allocated names are shown; TSK's virtual entries (``$OrphanFiles``, FAT's
``$MBR``/``$FAT1``/``$FAT2``) and NTFS metadata files (``$MFT``… in the root) are hidden.
"""

from __future__ import annotations

import stat
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import IntegrityError, RepositoryError
from .model import DIR, FILE, SYMLINK

# filesystems TSK reads, by probe.py's names; the rest need a kernel mount
TSK_TYPES = {"ext2", "ext3", "ext4", "ntfs", "vfat"}


class ByteSource(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class FsUnreadable(Exception):
    """TSK cannot open this filesystem (the message says why)."""


class FsReadError(Exception):
    """Bytes of a file inside the filesystem cannot be read (damaged backup range)."""


@dataclass
class FsEntry:
    name: str
    type: str  # model.FILE, DIR or SYMLINK (anything else is shown as a file)
    mode: int  # full st_mode
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    nlink: int
    target: str | None = None  # symlink target


def _tsk() -> Any:
    import pytsk3  # type: ignore[import-not-found]  # optional dependency (the "mount" extra): imported when first needed

    return pytsk3


def _image_class(tsk: Any) -> type:
    class _Image(tsk.Img_Info):  # type: ignore[misc, name-defined]
        """TSK image over an item reader; TSK sees read errors as I/O errors."""

        def __init__(self, src: ByteSource) -> None:
            self._src = src
            self.failed: str | None = None
            super().__init__(url="", type=tsk.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, length: int) -> bytes:
            try:
                return self._src.read(offset, length)
            except (IntegrityError, RepositoryError) as e:
                self.failed = str(e)  # TSK only sees a failed read: keep the reason
                raise OSError(str(e)) from None

        def get_size(self) -> int:
            return self._src.size

        def close(self) -> None:
            pass

    return _Image


# TSK's "mode" holds permission bits only; the type comes from meta.type
_PERM_MASK = 0o7777


class FsTree:
    """One filesystem, browsed by path (``/`` separated, relative to its root)."""

    def __init__(self, src: ByteSource, fs_type: str) -> None:
        tsk = _tsk()
        self._tsk = tsk
        self.fs_type = fs_type
        self._lock = threading.Lock()
        self._img = _image_class(tsk)(src)
        try:
            self._fs = tsk.FS_Info(self._img)
        except OSError as e:
            raise FsUnreadable(self._img.failed or f"The Sleuth Kit cannot read it ({e})"
                               ) from None
        self._hide_meta = fs_type in ("ntfs", "vfat")
        self._dirs: dict[str, dict[str, FsEntry]] = {}
        self._files: dict[int, Any] = {}

    @staticmethod
    def can_read(fs_type: str | None) -> bool:
        return fs_type in TSK_TYPES

    def _entry(self, f: Any) -> FsEntry | None:
        tsk = self._tsk
        name_info, meta = f.info.name, f.info.meta
        if meta is None or not (name_info.flags & tsk.TSK_FS_NAME_FLAG_ALLOC):
            return None
        name = name_info.name.decode("utf-8", "surrogateescape")
        if meta.type == tsk.TSK_FS_META_TYPE_DIR:
            kind, fmt = DIR, stat.S_IFDIR
        elif meta.type == tsk.TSK_FS_META_TYPE_LNK:
            kind, fmt = SYMLINK, stat.S_IFLNK
        elif meta.type == tsk.TSK_FS_META_TYPE_REG:
            kind, fmt = FILE, stat.S_IFREG
        else:
            return None  # virtual entries, devices, sockets: not files one can take out
        perm = int(meta.mode) & _PERM_MASK

        def ns(sec: int, nano: int) -> int:
            return int(sec) * 1_000_000_000 + int(nano or 0)

        target = None
        if kind == SYMLINK and meta.link:
            target = meta.link.decode("utf-8", "surrogateescape")
        return FsEntry(name=name, type=kind, mode=fmt | perm, uid=int(meta.uid),
                       gid=int(meta.gid), size=int(meta.size),
                       atime_ns=ns(meta.atime, meta.atime_nano),
                       mtime_ns=ns(meta.mtime, meta.mtime_nano),
                       ctime_ns=ns(meta.ctime, meta.ctime_nano),
                       ino=int(meta.addr), nlink=max(1, int(meta.nlink)), target=target)

    def listdir(self, path: str) -> dict[str, FsEntry]:
        """Entries of a directory by name; OSError(ENOENT/ENOTDIR) if there is none."""
        key = path.strip("/")
        with self._lock:
            cached = self._dirs.get(key)
            if cached is not None:
                return cached
            try:
                d = self._fs.open_dir(path="/" + key)
            except OSError:
                raise FileNotFoundError(key) from None
            out: dict[str, FsEntry] = {}
            try:
                for f in d:
                    e = self._entry(f)
                    if e is None or e.name in (".", ".."):
                        continue
                    if not key and self._hide_meta and e.name.startswith("$"):
                        continue
                    out.setdefault(e.name, e)
            except OSError as e:
                raise FsReadError(self._img.failed or str(e)) from None
            self._dirs[key] = out
            return out

    def lookup(self, path: str) -> FsEntry:
        """The entry at ``path`` (the root is a directory entry named "")."""
        key = path.strip("/")
        if not key:
            return self.root()
        parent, _, name = key.rpartition("/")
        entry = self.listdir(parent).get(name)
        if entry is None:
            raise FileNotFoundError(key)
        return entry

    def root(self) -> FsEntry:
        with self._lock:
            try:
                meta = self._fs.open("/").info.meta
            except (OSError, AttributeError):
                meta = None
        mtime = int(meta.mtime) * 1_000_000_000 if meta is not None else 0
        perm = int(meta.mode) & _PERM_MASK if meta is not None else 0o755
        return FsEntry("", DIR, stat.S_IFDIR | (perm or 0o755), 0, 0, 0, mtime, mtime, mtime,
                       int(self._fs.info.root_inum), 2)

    def read(self, entry: FsEntry, offset: int, length: int) -> bytes:
        """Bytes of a regular file; FsReadError if the backup cannot deliver them."""
        if offset >= entry.size or length <= 0:
            return b""
        length = min(length, entry.size - offset)
        with self._lock:
            f = self._files.get(entry.ino)
            if f is None:
                f = self._fs.open_meta(inode=entry.ino)
                if len(self._files) > 256:  # a bound on open TSK handles
                    self._files.clear()
                self._files[entry.ino] = f
            self._img.failed = None
            try:
                data = f.read_random(offset, length)
            except OSError as e:
                raise FsReadError(self._img.failed or str(e)) from None
            if self._img.failed:  # TSK may paper over a failed read with a short one
                raise FsReadError(self._img.failed)
        if len(data) != length:
            raise FsReadError(f"short read in {entry.name!r} at byte {offset}")
        return data
