"""A repository in a local directory: one file per value, written atomically.

A value is written to ``<name>.tmp-<pid>-<random>``, fsynced and renamed. A writer
killed mid-way leaves that file behind (a whole pack: 32 MiB); ``temporaries`` finds
such files and removes them, never a live writer's — by a lock, not by a guess:

- A writer holds ``flock(LOCK_EX)`` on its temporary file from just after creating it
  until after the rename; the kernel drops the lock when the process dies (SIGKILL
  too). So a temporary file whose lock we *get* has no writer between lock and rename.
- The one gap: created but not locked yet. The cleaner unlinks only while holding the
  lock and only if the name still is that inode; a writer then gets its lock on an
  unlinked inode, sees ``st_nlink == 0`` and starts again under a new name. Names are
  never reused, so a renamed file is never mistaken for a temporary.
- Files named by older versions (``.tmp<pid>.<hex>``, written without the lock) are
  removed only when unchanged for ``LEGACY_AGE`` seconds: a live writer writes a pack
  in seconds, and such writers are only ever an older diskvault on the same repository.

flock works across processes and containers of one kernel; on NFS, Linux maps it to
byte-range locks, which the server arbitrates between hosts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence

from ..errors import ObjectMissing, RepositoryExists, StorageError, StorageFull
from .base import Store

_TMP_NEW = re.compile(r"\.tmp-\d+-[0-9a-f]+$")
LEGACY_AGE = 24 * 3600
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16


def _writev_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> None:
    """Write the parts one after another with as few syscalls as the kernel allows
    (``writev`` may write less than asked: continue where it stopped)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        if n <= 0:  # a regular file writes something or raises; never spin
            raise OSError(errno.EIO, "short write")
        while n and i < len(views):
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


class LocalStore(Store):
    upload_concurrency = 1  # fsync'd writes to one disk: more threads only add memory
    remote = False
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.location = self.path

    def _p(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"invalid object name {name!r}")
        return os.path.join(self.path, name)

    def create(self) -> None:
        if os.path.exists(self.path) and (not os.path.isdir(self.path) or os.listdir(self.path)):
            raise RepositoryExists(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {self.path}: {e.strerror}") from None

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        try:
            with open(self._p(name), "rb", buffering=0) as f:
                if size is None:
                    if offset:
                        f.seek(offset)
                    return f.read()
                return os.pread(f.fileno(), size, offset)
        except FileNotFoundError:
            raise ObjectMissing(name) from None
        except OSError as e:
            raise StorageError(f"cannot read {name}: {e.strerror}") from None

    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        self.store_parts(name, [value])

    def store_parts(self, name: str, parts: list[bytes | bytearray | memoryview]) -> None:
        path = self._p(name)
        d = os.path.dirname(path)
        tmp = ""
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = self._create_locked_tmp(path)
            try:
                _writev_all(fd, parts)
                os.fsync(fd)  # releases the GIL: the chunk workers keep both cores
                os.replace(tmp, path)
            finally:
                os.close(fd)  # drops the lock: only after the rename (see the head)
            # the rename is durable only once the directory is synced
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(self.path) from None
            raise StorageError(f"cannot write {name}: {e.strerror}") from None

    @staticmethod
    def _create_locked_tmp(path: str) -> tuple[int, str]:
        """A new temporary file next to ``path``, locked, still linked (see the head)."""
        while True:
            tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(6)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink:
                    return fd, tmp
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # a cleaner removed it before we locked it: take a new name

    def temporaries(self, remove: bool = False) -> Sequence[tuple[str, int]]:
        """Temporary files left by writers that are gone: ``(name, size)``; ``remove``
        deletes them. A live writer's file is never listed (the module head argues it)."""
        found = []
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.path):
            for f in files:
                if ".tmp" not in f:
                    continue
                full = os.path.join(dirpath, f)
                size = self._stale_size(full, legacy=not _TMP_NEW.search(f), now=now,
                                        remove=remove)
                if size is not None:
                    found.append((os.path.relpath(full, self.path), size))
        return found

    @staticmethod
    def _stale_size(full: str, legacy: bool, now: float, remove: bool) -> int | None:
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None  # renamed or removed meanwhile, or not ours to open
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a live writer holds it
            st = os.fstat(fd)
            try:
                cur = os.lstat(full)
            except FileNotFoundError:
                return None
            if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino) or not st.st_nlink:
                return None
            if legacy and now - st.st_mtime < LEGACY_AGE:
                return None
            if remove:
                os.unlink(full)
            return st.st_size
        except OSError:
            return None
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._p(name))
        except FileNotFoundError:
            raise ObjectMissing(name) from None
        except OSError as e:
            raise StorageError(f"cannot delete {name}: {e.strerror}") from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        top = self._p(prefix) if prefix else self.path
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.path)
            for f in files:
                if ".tmp" in f:  # an interrupted store: never a value
                    continue
                name = f if rel == "." else f"{rel}/{f}"
                try:
                    yield name, os.stat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    continue

    def size(self, name: str) -> int:
        try:
            return os.stat(self._p(name)).st_size
        except FileNotFoundError:
            raise ObjectMissing(name) from None
