"""Random access to archived bytes: the read-only view under mount, NBD and instant restore.

An ``ItemReader`` serves any byte range of one item from its extent list: ``zero`` and
``unused`` runs are zeros made on the spot (the repository is never asked), ``data`` runs
come from a ``ChunkCache`` of decompressed chunks shared by every reader of an archive.
The cache is a bounded LRU; a chunk wanted by several threads at once is fetched once;
sequential reads trigger read-ahead of the next chunks on a thread pool, and a read that
spans several chunks fetches them in parallel. A chunk that is missing or fails
authentication raises ``IntegrityError`` naming exactly the item's byte range it covers:
the rest of the item stays readable, and no read ever returns wrong bytes.

The repository is seen through ``ArchiveSource``, a read-only role (chunks by id, archive
metadata) that ``Repository`` satisfies; callers open it under a shared lock.

One extent becomes bytes in exactly one place, ``_materialise``; a ``delta`` extent (a
base chunk with patches applied) goes through ``delta.materialize``, the function restore
uses too, with its base and patches taken from the same chunk cache.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import IntegrityError, StorageError, UsageError
from ..repository.manifest import ArchiveRef
from ..source.content import DATA, UNUSED, ZERO
from ..source.paths import FILE
from .delta import Delta, materialize
from .model import DELTA, Item

DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_READAHEAD_BYTES = 16 << 20
DEFAULT_WORKERS = 4
DISK_EXPORT = "disk.img"  # the name of the whole disk of a disk archive
EXTENT_NAMES = {DATA: "data", ZERO: "zero", UNUSED: "unused"}


class ChunkReader(Protocol):
    """The narrowest read role: decrypted, decompressed, id-checked chunks by id."""

    def get_chunk(self, chunk_id: bytes) -> bytes: ...


class ArchiveSource(ChunkReader, Protocol):
    """What opening an archive for reading needs: its ref and metadata, and chunks."""

    def archive_ref(self, name: str) -> ArchiveRef: ...

    def load_archive(self, ref: ArchiveRef) -> dict: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # fetched from the repository (reads and read-ahead)
    waits: int = 0  # found in flight: waited for another thread's fetch
    evictions: int = 0
    bytes: int = 0  # held now
    peak_bytes: int = 0


class ChunkCache:
    """Bounded LRU of decompressed chunks, thread-safe, one fetch per chunk in flight.

    ``capacity`` bounds the bytes held; a chunk larger than the capacity is returned
    without being kept. Failed fetches are not remembered: the next read asks again.
    """

    def __init__(self, source: ChunkReader, capacity: int = DEFAULT_CACHE_BYTES,
                 workers: int = DEFAULT_WORKERS) -> None:
        self.source = source
        self.capacity = capacity
        self.stats = CacheStats()
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="chunk-fetch")
        self._closed = False

    def get(self, chunk_id: bytes) -> bytes:
        data, fut, owner = self._claim(chunk_id)
        if data is not None:
            return data
        assert fut is not None
        if owner:
            self._fetch(chunk_id, fut)
        return fut.result()

    def submit(self, chunk_id: bytes) -> Future[bytes]:
        """A future of the chunk, fetched on the pool unless cached or already in flight."""
        data, fut, owner = self._claim(chunk_id)
        if data is not None:
            done: Future[bytes] = Future()
            done.set_result(data)
            return done
        assert fut is not None
        if owner:
            try:
                self._pool.submit(self._fetch, chunk_id, fut)
            except RuntimeError:  # the pool is shut down (closing): fetch here
                self._fetch(chunk_id, fut)
        return fut

    def has(self, chunk_id: bytes) -> bool:
        """Whether the chunk is cached now (a hint: it may be evicted at any time)."""
        return chunk_id in self._lru

    def prefetch(self, chunk_id: bytes) -> None:
        with self._lock:
            if chunk_id in self._lru or chunk_id in self._inflight:
                return
        self.submit(chunk_id)

    def _claim(self, chunk_id: bytes) -> tuple[bytes | None, Future[bytes] | None, bool]:
        """``(data, None, False)`` on a hit, else the in-flight future and whether the
        caller is the one that must fetch it."""
        with self._lock:
            data = self._lru.get(chunk_id)
            if data is not None:
                self._lru.move_to_end(chunk_id)
                self.stats.hits += 1
                return data, None, False
            fut = self._inflight.get(chunk_id)
            if fut is not None:
                self.stats.waits += 1
                return None, fut, False
            fut = Future()
            self._inflight[chunk_id] = fut
            self.stats.misses += 1
            return None, fut, True

    def _fetch(self, chunk_id: bytes, fut: Future[bytes]) -> None:
        try:
            data = self.source.get_chunk(chunk_id)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            with self._lock:
                self._inflight.pop(chunk_id, None)
            fut.set_exception(e)
            return
        with self._lock:
            self._inflight.pop(chunk_id, None)
            if len(data) <= self.capacity:
                self._lru[chunk_id] = data
                self.stats.bytes += len(data)
                while self.stats.bytes > self.capacity:
                    _, old = self._lru.popitem(last=False)
                    self.stats.bytes -= len(old)
                    self.stats.evictions += 1
                self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes)
        fut.set_result(data)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._lru.clear()
            self.stats.bytes = 0



class ItemReader:
    """Thread-safe random access to one item's bytes (see the module head)."""

    def __init__(self, item: Item, cache: ChunkCache,
                 readahead: int = DEFAULT_READAHEAD_BYTES) -> None:
        if item.extents is None:
            raise UsageError(f"{item.path} has no content to read")
        self.item = item
        self.path = item.path
        self.cache = cache
        self.readahead = min(readahead, cache.capacity // 4)
        starts: list[int] = []
        kinds: list[int] = []
        refs: list[bytes | Delta | None] = []
        pos = 0
        for kind, length, cid, delta in item.extents.records():
            starts.append(pos)
            kinds.append(kind)
            refs.append(delta if delta is not None else cid)
            pos += length
        if pos != item.size:
            raise IntegrityError(f"{item.path}: extents cover {pos} bytes, the item has "
                                 f"{item.size}")
        self.size: int = pos
        self._starts = starts
        self._ends = starts[1:] + [pos]
        self._kinds = kinds
        self._refs = refs
        self._ra_lock = threading.Lock()
        self._recent_ends: OrderedDict[int, None] = OrderedDict()  # where recent reads ended

    # --- reading ------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; short only at the end of the item."""
        if offset < 0 or length < 0:
            raise UsageError(f"{self.path}: negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first = self._index(offset)
        last = self._index(end - 1)
        self._maybe_readahead(offset, end, last)
        if first == last:
            return self._slice(first, offset, end, None)
        # several extents: start every chunk fetch before waiting for any of them
        futs = {i: self._start(i) for i in range(first, last + 1)}
        parts = [self._slice(i, max(offset, self._starts[i]), min(end, self._ends[i]), futs[i])
                 for i in range(first, last + 1)]
        return b"".join(parts)

    def extents(self, offset: int = 0, length: int | None = None
                ) -> Iterator[tuple[int, int, str]]:
        """``(offset, length, kind)`` runs covering the range, neighbours of one kind merged."""
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return
        run_start, run_kind = offset, None
        for i in range(self._index(offset), self._index(end - 1) + 1):
            kind = EXTENT_NAMES.get(self._kinds[i], "data")
            if kind != run_kind:
                if run_kind is not None:
                    yield run_start, max(offset, self._starts[i]) - run_start, run_kind
                run_start, run_kind = max(offset, self._starts[i]), kind
        assert run_kind is not None
        yield run_start, end - run_start, run_kind

    def cached(self, offset: int, length: int) -> bool:
        """Whether reading the range needs no fetch now (a hint for callers that would
        rather not hand a read to a thread when it is served from memory)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return True
        for i in range(self._index(offset), self._index(end - 1) + 1):
            ref = self._refs[i]
            if isinstance(ref, Delta):
                if not all(self.cache.has(c) for c in ref.chunk_ids()):
                    return False
            elif self._kinds[i] != DATA or ref is None:
                if self._kinds[i] not in (ZERO, UNUSED):
                    return False
            elif not self.cache.has(ref):
                return False
        return True

    def _index(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def _start(self, i: int) -> Future[bytes] | None:
        kind, ref = self._kinds[i], self._refs[i]
        if isinstance(ref, Delta):  # base and patches fetched in parallel, combined later
            for c in ref.chunk_ids():
                self.cache.prefetch(c)
            return None
        if kind == DATA and ref is not None:
            return self.cache.submit(ref)
        return None

    def _slice(self, i: int, a: int, z: int, fut: Future[bytes] | None) -> bytes:
        s = self._starts[i]
        data = self._materialise(i, fut)
        if data is None:
            return bytes(z - a)
        return data[a - s : z - s]

    def _materialise(self, i: int, fut: Future[bytes] | None) -> bytes | None:
        """The bytes of extent ``i`` (None: all zeros). The one place that knows kinds."""
        kind, ref = self._kinds[i], self._refs[i]
        if kind in (ZERO, UNUSED):
            return None
        s, e = self._starts[i], self._ends[i]
        if not (kind == DATA and isinstance(ref, bytes) or kind == DELTA
                and isinstance(ref, Delta)):
            raise IntegrityError(f"{self.path}: bytes {s}-{e - 1}: unknown extent kind {kind}")
        try:
            if isinstance(ref, Delta):
                data = materialize(e - s, ref, self.cache.get)
            else:
                data = fut.result() if fut is not None else self.cache.get(ref)
        except IntegrityError as err:  # ObjectMissing is one too
            raise IntegrityError(f"{self.path}: bytes {s}-{e - 1} cannot be read: {err}") \
                from None
        except StorageError as err:
            raise StorageError(f"{self.path}: bytes {s}-{e - 1} cannot be read: {err}") \
                from None
        if len(data) != e - s:
            raise IntegrityError(f"{self.path}: bytes {s}-{e - 1}: chunk size mismatch")
        return data

    def _maybe_readahead(self, offset: int, end: int, last: int) -> None:
        """On a sequential read, start fetching the chunks up to ``readahead`` bytes ahead.

        A read is sequential if it starts where a recent read ended: several streams
        (NBD connections, requests in flight out of order) each keep their read-ahead.
        """
        if self.readahead <= 0:
            return
        with self._ra_lock:
            sequential = offset == 0 or offset in self._recent_ends
            self._recent_ends[end] = None
            self._recent_ends.pop(offset, None)
            while len(self._recent_ends) > 64:
                self._recent_ends.popitem(last=False)
        if not sequential or last + 1 >= len(self._starts):
            return
        target = min(self.size, end + self.readahead)
        for i in range(last + 1, self._index(target - 1) + 1):
            ref = self._refs[i]
            if isinstance(ref, Delta):
                for c in ref.chunk_ids():
                    self.cache.prefetch(c)
            elif self._kinds[i] == DATA and ref is not None:
                self.cache.prefetch(ref)


@dataclass
class _Part:
    start: int
    reader: ItemReader | None  # None: a gap no item covers (zeros)
    size: int


class ConcatReader(ItemReader):
    """Items laid end to end (at their ``disk_offset``): a whole-disk archive as one disk.

    Bytes no item covers (none in archives made by ``disk backup``; up to ``size`` if it
    is larger) read as zeros.
    """

    def __init__(self, readers: list[ItemReader], cache: ChunkCache, size: int | None = None,
                 path: str = DISK_EXPORT) -> None:
        parts: list[_Part] = []
        pos = 0
        for r in sorted(readers, key=lambda r: _disk_offset(r, 0)):
            at = _disk_offset(r, pos)
            if at < pos:
                raise IntegrityError(f"{r.path} overlaps the item before it in the disk")
            if at > pos:
                parts.append(_Part(pos, None, at - pos))
            parts.append(_Part(at, r, r.size))
            pos = at + r.size
        if size is not None and size > pos:
            parts.append(_Part(pos, None, size - pos))
            pos = size
        self.item = Item(path=path, type=FILE, mode=0o100600, size=pos, source="disk")
        self.path = path
        self.size = pos
        self.cache = cache
        self._parts = parts
        self._pstarts = [p.start for p in parts]

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise UsageError(f"{self.path}: negative offset or length")
        return b"".join(bytes(z - a) if p.reader is None else p.reader.read(a, z - a)
                        for p, a, z in self._pieces(offset, offset + length))

    def extents(self, offset: int = 0, length: int | None = None
                ) -> Iterator[tuple[int, int, str]]:
        end = self.size if length is None else offset + length
        run: list = []  # [offset, length, kind] of the run being merged
        for p, a, z in self._pieces(offset, end):
            sub = [(a, z - a, "zero")] if p.reader is None else p.reader.extents(a, z - a)
            for o, n, kind in sub:
                if run and run[2] == kind:
                    run[1] += n
                    continue
                if run:
                    yield run[0], run[1], run[2]
                run = [p.start + o, n, kind]
        if run:
            yield run[0], run[1], run[2]

    def cached(self, offset: int, length: int) -> bool:
        return all(p.reader is None or p.reader.cached(a, z - a)
                   for p, a, z in self._pieces(offset, offset + length))

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[_Part, int, int]]:
        """``(part, start, end)`` relative to each part, for the disk range [offset, end)."""
        end = min(end, self.size)
        if offset >= end:
            return
        i = bisect.bisect_right(self._pstarts, offset) - 1
        while i < len(self._parts) and self._parts[i].start < end:
            p = self._parts[i]
            yield p, max(offset, p.start) - p.start, min(end, p.start + p.size) - p.start
            i += 1


def _disk_offset(r: ItemReader, default: int) -> int:
    off = r.item.disk_offset
    return default if off is None else int(off)


@dataclass
class ArchiveReaders:
    """Readers of one archive's content items, by path, and the whole disk if any."""

    name: str
    items: dict[str, ItemReader]
    disk: ConcatReader | None
    cache: ChunkCache
    meta: dict = field(default_factory=dict)

    def exports(self) -> dict[str, ItemReader]:
        """Every readable byte stream by name: the whole disk first, then the items."""
        out: dict[str, ItemReader] = {}
        if self.disk is not None:
            out[DISK_EXPORT] = self.disk
        out.update(self.items)
        return out

    def get(self, name: str) -> ItemReader:
        r = self.exports().get(name.strip("/") if name != DISK_EXPORT else name)
        if r is None:
            raise UsageError(f"archive {self.name!r} has no item {name!r} "
                             f"(items: {', '.join(self.exports()) or 'none'})")
        return r

    def default(self) -> ItemReader | None:
        """The whole disk of a disk archive, or the only item; None if that is ambiguous."""
        if self.disk is not None:
            return self.disk
        if len(self.items) == 1:
            return next(iter(self.items.values()))
        return None

    def close(self) -> None:
        self.cache.close()

    def __enter__(self) -> ArchiveReaders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_archive_readers(repo_reader: ArchiveSource, archive_name: str,
                         cache_bytes: int = DEFAULT_CACHE_BYTES,
                         workers: int = DEFAULT_WORKERS,
                         readahead: int = DEFAULT_READAHEAD_BYTES) -> ArchiveReaders:
    """Readers for every content item of an archive (and ``disk.img`` for disk archives)."""
    from .view import ArchiveView

    view = ArchiveView.open(repo_reader, archive_name)
    cache = ChunkCache(repo_reader, cache_bytes, workers)
    try:
        items = {i.path: ItemReader(i, cache, readahead) for i in view.items
                 if i.extents is not None}
        disk_meta = view.meta.get("disk")
        disk = None
        if isinstance(disk_meta, dict):
            size = disk_meta.get("size")
            disk = ConcatReader([r for r in items.values() if r.item.disk_offset is not None],
                                cache, size if isinstance(size, int) else None)
    except BaseException:
        cache.close()
        raise
    return ArchiveReaders(archive_name, items, disk, cache, view.meta)
