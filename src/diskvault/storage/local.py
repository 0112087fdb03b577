"""A repository in a local directory: one file per value, written atomically."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from ..errors import ObjectMissing, RepositoryExists, StorageError, StorageFull
from .base import Store


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
        path = self._p(name)
        tmp = f"{path}.tmp{os.getpid()}.{id(value):x}"
        d = os.path.dirname(path)
        try:
            os.makedirs(d, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(value)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            # the rename is durable only once the directory is synced
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(self.path) from None
            raise StorageError(f"cannot write {name}: {e.strerror}") from None

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
