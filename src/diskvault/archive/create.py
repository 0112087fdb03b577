"""Creating an archive: read → zero check → hash → dedup → compress+seal → pack → store.

The reading thread cuts content into pieces and submits data pieces to worker
threads (hash, dedup lookup, compress, seal — all release the GIL on large buffers);
results are taken back in order, so extents and packs keep the content order. The
number of pieces in flight is bounded, which bounds memory.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from ..chunking.base import DEFAULT_SEEKABLE, DEFAULT_STREAM, ChunkerParams, make_chunker
from ..errors import ArchiveExists
from ..repository.compression import Compression
from ..repository.repo import Repository
from ..repository.writer import ChunkWriter
from ..source.content import DATA, Content, ReadStats, SeekableContent
from ..source.paths import Meta, Source
from ..storage.url import mask
from .items import write_item_stream
from .model import Extents, Item

ARCHIVE_VERSION = 1


@dataclass
class CreateStats:
    original: int = 0  # bytes of content in the archive
    read: int = 0  # bytes read from sources
    zero: int = 0  # all-zero bytes (incl. holes): not stored
    holes: int = 0  # zero bytes that were holes: not even read
    unused: int = 0  # free filesystem space: not read, not stored
    dedup: int = 0  # data bytes whose chunk was already stored
    new_chunks: int = 0
    new_plain: int = 0  # plain bytes of new chunks
    new_stored: int = 0  # compressed+sealed bytes of new chunks
    items: int = 0
    seconds: float = 0.0
    chunks: int = 0  # data chunks referenced, duplicates counted
    compressed: int = 0  # stored bytes of every chunk referenced, duplicates counted


    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CreateOptions:
    compression: Compression = field(default_factory=lambda: Compression.parse("lz4"))
    chunker: ChunkerParams | None = None  # None: per-source default
    workers: int = 2
    dry_run: bool = False
    comment: str = ""
    progress: Callable[[int, int | None], None] | None = None  # (done, total)
    upload_threads: int | None = None  # packs uploaded at once; None: what the store suits
    # called once every byte is read, before the archive is committed: a point-in-time
    # guard (fsfreeze) raises here if its time limit ran out during the read
    before_commit: Callable[[], None] | None = None


class _DryWriter:
    """Stands in for ChunkWriter in --dry-run: remembers ids, writes nothing."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.seen: dict[bytes, int] = {}  # id → sealed size: what a real run would store

    def known(self, cid: bytes) -> bool:
        return cid in self.seen or cid in self.repo.index

    def add(self, cid: bytes, blob: bytes, plain: int) -> bool:
        if self.known(cid):
            return False
        self.seen[cid] = len(blob)
        return True

    def stored_size(self, cid: bytes) -> int | None:
        return self.seen.get(cid)

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


class ArchiveBuilder:
    def __init__(self, repo: Repository, opts: CreateOptions) -> None:
        self.repo = repo
        self.opts = opts
        repo.codec.compression = opts.compression
        self.writer: ChunkWriter | _DryWriter = (
            _DryWriter(repo) if opts.dry_run else repo.writer(opts.upload_threads))
        self.pool = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="chunk")
        self.max_inflight = 2 * max(1, opts.workers) + 2
        self.items: list[Item] = []
        self.stats = CreateStats()
        self.started = time.time()
        self._last_progress = 0.0
        self.total: int | None = None  # bytes expected, for progress ETA

    # --- per chunk ---------------------------------------------------------------

    def _seal(self, data: bytes | bytearray) -> tuple[bytes, bytes | None]:
        cid = self.repo.id_hash(data)
        if self.writer.known(cid):
            return cid, None
        return cid, self.repo.codec.seal(cid, data)

    def _take(self, entry: tuple[Future | None, int, int], extents: Extents,
              istats: dict) -> None:
        fut, kind, length = entry
        if fut is None:  # a zero or unused run, queued only to keep the order
            extents.append(kind, length)
            return
        cid, blob = fut.result()
        extents.append(DATA, length, cid)
        self.stats.chunks += 1
        if blob is not None and self.writer.add(cid, blob, length):
            self.stats.new_chunks += 1
            self.stats.new_plain += length
            self.stats.new_stored += len(blob)
        else:
            self.stats.dedup += length
            istats["dedup"] += length

    # --- per item ----------------------------------------------------------------

    def add(self, meta: Meta | Item, content: Content | None = None,
            chunker: ChunkerParams | None = None) -> Item:
        item = meta if isinstance(meta, Item) else Item(**asdict(meta))
        if content is not None:
            params = chunker or self.opts.chunker or (
                DEFAULT_SEEKABLE if isinstance(content, SeekableContent) else DEFAULT_STREAM)
            self._add_content(item, content, params)
        self.items.append(item)
        self.stats.items += 1
        return item

    def _add_content(self, item: Item, content: Content, params: ChunkerParams) -> None:
        extents = Extents()
        istats = {"dedup": 0}
        queue: deque[tuple[Future | None, int, int]] = deque()
        busy = 0  # data pieces in flight: bounds memory to max_inflight chunks
        before = ReadStats(**asdict(content.stats))
        size = 0
        for kind, length, data in content.pieces(make_chunker(params, self.repo.chunker_seed)):
            size += length
            if kind == DATA:
                assert data is not None  # zero and unused runs alone carry no bytes
                queue.append((self.pool.submit(self._seal, data), kind, length))
                busy += 1
            else:
                queue.append((None, kind, length))
            while busy >= self.max_inflight or (queue and queue[0][0] is None):
                entry = queue.popleft()
                busy -= entry[0] is not None
                self._take(entry, extents, istats)
            self._tick(size)
        while queue:
            self._take(queue.popleft(), extents, istats)
        self._finish_item(item, content, extents, istats, before, size)

    def _finish_item(self, item: Item, content: Content, extents: Extents, istats: dict,
                     before: ReadStats, size: int) -> None:
        s = content.stats
        item.size = size
        item.extents = extents
        item.stats = {"read": s.read - before.read, "zero": s.zero - before.zero,
                      "unused": s.unused - before.unused, "dedup": istats["dedup"]}
        self.stats.original += size
        self.stats.read += s.read - before.read
        self.stats.zero += s.zero - before.zero
        self.stats.holes += s.holes - before.holes
        self.stats.unused += s.unused - before.unused

    def _tick(self, item_pos: int) -> None:
        if self.opts.progress is None:
            return
        now = time.monotonic()
        if now - self._last_progress >= 0.2:
            self._last_progress = now
            self.opts.progress(self.stats.original + item_pos, self.total)

    # --- the whole archive ---------------------------------------------------------

    def _compressed(self) -> int:
        """Stored size of every data chunk the items reference (after ``flush``: all
        are indexed, or known to the dry-run writer)."""
        total = 0
        dry = self.writer if isinstance(self.writer, _DryWriter) else None
        for item in self.items:
            for kind, length, cid in item.extents or ():
                if kind != DATA or cid is None:
                    continue
                loc = self.repo.index.get(cid)
                size = loc.length if loc is not None else (dry.stored_size(cid) if dry else None)
                total += size if size is not None else length
        return total

    def commit(self, name: str, extra: dict | None = None) -> dict:
        if self.opts.before_commit is not None:
            self.opts.before_commit()
        self.stats.seconds = time.time() - self.started
        self.writer.flush()  # new chunks indexed: their stored sizes are known
        self.stats.compressed = self._compressed()
        meta = {
            "version": ARCHIVE_VERSION, "name": name, "time": self.started,
            "time_end": time.time(), "hostname": socket.gethostname(),
            "username": _username(), "command_line": [mask(a) for a in sys.argv],
            "comment": self.opts.comment, "compression": str(self.opts.compression),
            "chunker": str(self.opts.chunker) if self.opts.chunker else "default",
            "stats": self.stats.to_dict(), "nitems": len(self.items),
        }
        if extra:
            meta.update(extra)
        meta["items"] = write_item_stream(self.items, self._store_meta_chunk,
                                          self.repo.chunker_seed)
        if not self.opts.dry_run:  # commit_archive refuses a taken name under the lock
            self.repo.commit_archive(name, meta, self.writer)  # type: ignore[arg-type]
        return meta

    def _store_meta_chunk(self, data: bytes) -> bytes:
        cid, blob = self._seal(data)
        if blob is not None:
            self.writer.add(cid, blob, len(data))
        return cid

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.writer.close()


def _username() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container
        return str(os.getuid())


def refuse_taken_name(repo: Repository, name: str) -> None:
    """Refuse a taken archive name before a byte is read or a command started (the
    manifest update at commit refuses it again, under the lock, against a race)."""
    if name in repo.manifest.archives:
        raise ArchiveExists(name)


def create_archive(repo: Repository, name: str, sources: Iterable[Source],
                   opts: CreateOptions, extra: dict | None = None) -> tuple[dict, CreateStats]:
    refuse_taken_name(repo, name)
    b = ArchiveBuilder(repo, opts)
    try:
        for src in sources:
            try:
                b.add(src.item, src.content)
            finally:
                if src.close:
                    src.close()
        meta = b.commit(name, extra)
    finally:
        b.close()
    return meta, b.stats
