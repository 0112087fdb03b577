"""The key/value storage interface every backend implements.

Backends see opaque bytes under names like ``packs/ab/ab12…``; compression and
encryption happen above them (repository/objects.py). Names use ``/`` as separator
and contain only ``[a-z0-9._-]`` and ``/``.

Consistency contract (what the repository layer relies on):
- ``store`` is atomic and durable when it returns: a reader sees the whole old
  value, the whole new value, or (for a new name) nothing — never a prefix.
- ``load`` of a missing name raises ``ObjectMissing``; any other failure raises
  ``StorageError`` (``StorageFull`` when out of space).
- ``list(prefix)`` yields every name stored under that directory prefix, recursively,
  in no particular order; names stored before ``list`` started are always listed.
- ``delete`` of a missing name raises ``ObjectMissing``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence


class Store(ABC):
    """A flat namespace of immutable-ish byte values."""

    #: human-readable location for messages
    location: str = ""
    #: uploads worth running at once (network stores gain from more; a local disk doesn't)
    upload_concurrency: int = 4
    #: every request crosses a network: worth a local cache of immutable objects
    remote: bool = True

    @abstractmethod
    def create(self) -> None:
        """Create an empty store; raise RepositoryExists if one (or other data) is there."""

    @abstractmethod
    def exists(self) -> bool:
        """True if the store's root exists at all."""

    @abstractmethod
    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        """Return the value (or ``size`` bytes of it from ``offset``)."""

    @abstractmethod
    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        """Write the value atomically and durably (replacing any old value)."""

    def store_parts(self, name: str, parts: list[bytes | bytearray | memoryview]) -> None:
        """``store(name, b"".join(parts))``; a backend that can write the parts one
        after another (a local file: ``writev``) overrides it to skip the join."""
        self.store(name, b"".join(parts))

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the value."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield ``(name, size)`` for every value under ``prefix`` (a directory, '' = all)."""

    def size(self, name: str) -> int:
        """Size of one value; backends may override with a cheaper call."""
        return len(self.load(name))

    def reserve_connections(self, n: int) -> None:  # noqa: B027 - optional hook
        """Make room for ``n`` operations at once (``create --upload-connections``).

        Network backends size their connection pool for ``upload_concurrency``; asked
        for more uploads than that, they grow it, or the extra threads would only wait.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and file handles."""

    def temporaries(self, remove: bool = False) -> Sequence[tuple[str, int]]:
        """``(name, size)`` of partial writes left by writers that died (never a live
        writer's); ``remove`` deletes them. Backends without such leftovers: none."""
        return []

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreWrapper(Store):
    """Base of wrappers around another store (retry, faults): what the wrapped backend
    knows about itself (connection pool, locality) passes through unchanged."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.location = inner.location

    @property
    def upload_concurrency(self) -> int:  # type: ignore[override]
        return self.inner.upload_concurrency

    @property
    def remote(self) -> bool:  # type: ignore[override]
        return self.inner.remote

    def reserve_connections(self, n: int) -> None:
        self.inner.reserve_connections(n)

    def temporaries(self, remove: bool = False) -> Sequence[tuple[str, int]]:
        return self.inner.temporaries(remove)

    def close(self) -> None:
        self.inner.close()
