"""An in-memory store: fast and exact, for tests and fault-injection wrappers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ..errors import ObjectMissing, RepositoryExists
from .base import Store


class MemoryStore(Store):
    remote = False
    def __init__(self, location: str = "memory:") -> None:
        self.location = location
        self.data: dict[str, bytes] = {}
        self.created = False
        self._lock = threading.Lock()

    def create(self) -> None:
        if self.created:
            raise RepositoryExists(self.location)
        self.created = True

    def exists(self) -> bool:
        return self.created

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        try:
            v = self.data[name]
        except KeyError:
            raise ObjectMissing(name) from None
        return v[offset:] if size is None else v[offset : offset + size]

    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self.data[name] = bytes(value)

    def delete(self, name: str) -> None:
        with self._lock:
            if self.data.pop(name, None) is None:
                raise ObjectMissing(name)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        p = prefix.rstrip("/") + "/" if prefix else ""
        with self._lock:
            items = [(k, len(v)) for k, v in self.data.items() if k.startswith(p)]
        yield from items
