"""The FUSE face of archives: read-only operations over ``namespace.ArchiveTree``.

Borg's layout: with an archive given, its namespace is the mount's root; without one,
one folder per archive, each opened when first looked into. File contents come from
the archive's item readers (bounded chunk cache, read-ahead) or, inside ``ITEM.files``,
from The Sleuth Kit. A range the backup cannot deliver (a damaged or missing chunk) is
``EIO`` for exactly the reads that touch it — never wrong bytes.

``mfusepy`` has no wrapper for libfuse3's ``lseek`` callback; ``SparseFUSE`` adds it so
``SEEK_DATA``/``SEEK_HOLE`` (``cp --sparse``, ``qemu-img map``) see the zero and unused
runs as holes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

from ..errors import DiskvaultError
from ..repository.repo import Repository
from .fstree import FsReadError
from .model import DIR, SYMLINK
from .mounting import PID_XATTR
from .namespace import ArchiveTree, Node
from .reader import ArchiveReaders, open_archive_readers
from .view import ArchiveView

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # before mfusepy loads libfuse

import mfusepy  # type: ignore[import-untyped]  # noqa: E402 - needs the library name above

log = logging.getLogger("diskvault.mount")
SEEK_DATA, SEEK_HOLE = 3, 4
_BLOCK = 512


class SparseFUSE(mfusepy.FUSE):
    """mfusepy plus the ``lseek`` callback (libfuse3 only), and per-file cache modes."""

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.open(path.decode(self.encoding, self.errors), fi.flags)
        # images and partitions bypass the page cache: the kernel then asks in reads as
        # large as the caller's (up to 1 MiB) instead of 128 KiB, and our chunk cache
        # does the caching; files inside filesystems keep it (mmap, exec)
        if self.operations.direct_io(fi.fh):
            fi.direct_io = 1
        else:
            fi.keep_cache = 1  # archives never change: what is cached stays valid
        return 0

    def lseek(self, path: bytes | None, offset: int, whence: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else 0
        return int(self.operations.lseek(
            None if path is None else path.decode(self.encoding, self.errors),
            offset, whence, fh))


class RepoTree:
    """Archives of a repository by name, each opened (metadata, readers) on first use."""

    def __init__(self, repo: Repository, archive: str | None, cache_bytes: int,
                 log_fn: Callable[[str], None],
                 on_open: Callable[[str, ArchiveTree], None] | None = None) -> None:
        self.repo = repo
        self.on_open = on_open  # runs in a thread when an archive folder is first opened
        self.archive = archive
        self.cache_bytes = cache_bytes
        self.log = log_fn
        self._lock = threading.Lock()
        self._open: dict[str, tuple[ArchiveTree, ArchiveReaders]] = {}
        self.mtime_ns = int(repo.manifest.time * 1e9)

    def names(self) -> list[str]:
        return [ref.name for ref in self.repo.manifest.sorted_archives()]

    def tree(self, name: str) -> ArchiveTree:
        with self._lock:
            if name in self._open:
                return self._open[name][0]
            ref = self.repo.manifest.archives.get(name)
            if ref is None:
                raise FileNotFoundError(name)
            view = ArchiveView.open(self.repo, name)
            readers = open_archive_readers(self.repo, name, cache_bytes=self.cache_bytes)
            tree = ArchiveTree(view.items, dict(readers.items), readers.disk,
                               int(ref.time * 1e9), self.log,
                               kernel=self.archive is not None or self.on_open is not None)
            self._open[name] = (tree, readers)
        if self.archive is None and self.on_open is not None:
            # kernel mounts go through this very mount: never inside a FUSE request
            threading.Thread(target=self.on_open, args=(name, tree), daemon=True,
                             name=f"open {name}").start()
        return tree

    def split(self, path: str) -> tuple[ArchiveTree | None, str]:
        """(the archive's tree, the path inside it); (None, "") for the repository root."""
        path = path.strip("/")
        if self.archive is not None:
            return self.tree(self.archive), path
        if not path:
            return None, ""
        name, _, rest = path.partition("/")
        return self.tree(name), rest

    def close(self) -> None:
        with self._lock:
            for _, readers in self._open.values():
                readers.close()
            self._open.clear()


def _oserror(e: BaseException) -> OSError:
    if isinstance(e, OSError) and e.errno:
        return e
    return OSError(errno.EIO, str(e))


class DiskvaultFS(mfusepy.Operations):
    """Read-only FUSE operations; every path is resolved through ``RepoTree``."""

    use_ns = True

    def __init__(self, repo_tree: RepoTree, on_ready: Callable[[], None] | None = None
                 ) -> None:
        self.rt = repo_tree
        self.on_ready = on_ready
        self._fh: dict[int, Node] = {}
        self._next_fh = 1
        self._lock = threading.Lock()

    # --- resolution ---------------------------------------------------------------

    def _node(self, path: str) -> Node:
        try:
            tree, rel = self.rt.split(path)
            if tree is None:
                return Node(DIR, stat.S_IFDIR | 0o755, mtime_ns=self.rt.mtime_ns,
                            atime_ns=self.rt.mtime_ns, ctime_ns=self.rt.mtime_ns)
            return tree.lookup(rel)
        except (FileNotFoundError, NotADirectoryError):
            raise OSError(errno.ENOENT, path) from None
        except (DiskvaultError, FsReadError) as e:
            log.error("%s: %s", path, e)
            raise OSError(errno.EIO, str(e)) from None

    # --- metadata -----------------------------------------------------------------

    def init(self, path: str) -> None:
        if self.on_ready is not None:
            threading.Thread(target=self.on_ready, name="ready", daemon=True).start()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        n = self._node(path)
        return {"st_mode": n.mode, "st_size": n.size, "st_uid": n.uid, "st_gid": n.gid,
                "st_nlink": max(n.nlink, 2 if n.is_dir else 1), "st_rdev": n.rdev,
                "st_atime": n.atime_ns, "st_mtime": n.mtime_ns, "st_ctime": n.ctime_ns,
                "st_blocks": (n.size + _BLOCK - 1) // _BLOCK,
                # cp, cat and dd size their buffers by this: 1 MiB requests for images
                "st_blksize": 1 << 20 if n.content is not None else 1 << 16}

    def readdir(self, path: str, fh: int) -> list[str]:
        try:
            tree, rel = self.rt.split(path)
            names = self.rt.names() if tree is None else list(tree.listdir(rel))
        except (FileNotFoundError, NotADirectoryError):
            raise OSError(errno.ENOENT, path) from None
        except (DiskvaultError, FsReadError) as e:
            log.error("%s: %s", path, e)
            raise OSError(errno.EIO, str(e)) from None
        return [".", "..", *names]

    def readlink(self, path: str) -> str:
        n = self._node(path)
        if n.type != SYMLINK or n.target is None:
            raise OSError(errno.EINVAL, path)
        return n.target

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if path == "/" and name == PID_XATTR:  # umount waits for this process to end
            return str(os.getpid()).encode()
        n = self._node(path)
        value = (n.xattrs or {}).get(name.encode("utf-8", "surrogateescape"))
        if value is None:
            raise OSError(errno.ENODATA, name)
        return value

    def listxattr(self, path: str) -> list[str]:
        n = self._node(path)
        return [k.decode("utf-8", "surrogateescape") for k in (n.xattrs or {})]

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 1 << 16, "f_frsize": _BLOCK, "f_namemax": 255}

    # --- content ------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
            raise OSError(errno.EROFS, path)
        n = self._node(path)
        if n.is_dir:
            raise OSError(errno.EISDIR, path)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._fh[fh] = n
        return fh

    def direct_io(self, fh: int) -> bool:
        n = self._fh.get(fh)
        return n is not None and n.content is not None

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._fh.pop(fh, None)
        return 0

    def _fh_node(self, path: str, fh: int) -> Node:
        n = self._fh.get(fh)
        return n if n is not None else self._node(path)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        n = self._fh_node(path, fh)
        try:
            if n.content is not None:
                return n.content.read(offset, size)
            if n.tree is not None and n.entry is not None:
                return n.tree.read(n.entry, offset, size)
        except (DiskvaultError, FsReadError) as e:
            log.error("%s: %s", path, e)
            raise OSError(errno.EIO, str(e)) from None
        return b""

    def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
        n = self._fh_node(path, fh)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, path)
        if offset < 0 or offset >= n.size:
            raise OSError(errno.ENXIO, path)
        extents = getattr(n.content, "extents", None)
        if extents is None:  # files inside filesystems: all data
            return offset if whence == SEEK_DATA else n.size
        for start, length, kind in extents(offset):
            if (kind == "data") == (whence == SEEK_DATA):
                return max(start, offset)
            del length
        if whence == SEEK_HOLE:
            return n.size
        raise OSError(errno.ENXIO, path)

    def destroy(self, path: str) -> None:
        self.rt.close()
