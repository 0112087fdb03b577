"""Creating an archive: read → zero check → hash → dedup → compress+seal → pack → store.

The reading thread cuts content into pieces and submits data pieces to worker
threads (hash, dedup lookup, compress, seal — all release the GIL on large buffers);
results are taken back in order, so extents and packs keep the content order. The
number of pieces in flight is bounded, which bounds memory.

With a parent archive (format version 2, fixed chunker) every window is compared with
the parent's window at the same offset by 4 KiB block fingerprints: an unchanged window
reuses the parent's extent, a window with few changed blocks becomes a ``delta`` extent
(delta.py), and the item gets its own fingerprint stream for the next backup. With
``ChangedRanges`` only the listed blocks are read; every other window is the parent's.
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

import numpy as np

from ..chunking.base import DEFAULT_SEEKABLE, DEFAULT_STREAM, ChunkerParams, make_chunker
from ..crypto.ids import BlockIdHasher
from ..errors import ArchiveExists, IntegrityError, ObjectMissing, UsageError
from ..repository.compression import DEFAULT_COMPRESSION, Compression
from ..repository.objects import Sealed
from ..repository.repo import Repository
from ..repository.writer import ChunkWriter
from ..source.content import DATA, Content, ReadStats, SeekableContent, _pread_into
from ..source.paths import Meta, Source
from ..storage.url import mask
from .delta import (
    BLOCK,
    FP_CHUNK_BLOCKS,
    FP_LEN,
    MAX_CHANGED_FRACTION,
    MAX_DEPTH,
    Delta,
    Fingerprinter,
    changed_blocks,
    encode_patch,
    merge_span,
    patch_blocks,
)
from .items import write_item_stream
from .model import DELTA, Extents, Item, Record
from .parent import ChangedRanges, FpReader, ParentArchive, ParentCursor

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
    parent: int = 0  # bytes taken from the parent archive without being read
    delta: int = 0  # window bytes stored as delta extents (new patches)
    delta_blocks: int = 0  # 4 KiB blocks in those patches: blocks changed
    fingerprints: int = 0  # stored bytes of new block-fingerprint chunks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CreateOptions:
    compression: Compression = field(default_factory=lambda: DEFAULT_COMPRESSION)
    chunker: ChunkerParams | None = None  # None: per-source default
    workers: int = 2
    dry_run: bool = False
    comment: str = ""
    progress: Callable[[int, int | None], None] | None = None  # (done, total)
    upload_threads: int | None = None  # packs uploaded at once; None: what the store suits
    # called once every byte is read, before the archive is committed: a point-in-time
    # guard (fsfreeze) raises here if its time limit ran out during the read
    before_commit: Callable[[], None] | None = None
    parent: ParentArchive | None = None  # compare with this archive (delta extents)
    changed: ChangedRanges | None = None  # only these ranges changed since ``parent``
    source_id: object = None  # what was backed up (paths, disk identity): finds parents


@dataclass
class _Window:
    """What one window of content became: extents, chunks to store, fingerprints."""

    records: list[Record]
    blobs: list[tuple[bytes, Sealed | None, int]] = field(default_factory=list)  # id, blob, plain
    fps: bytes | None = None
    delta_blocks: int = -1  # ≥ 0: stored as a new delta with this many changed blocks
    parent: bool = False  # reused from the parent


@dataclass
class _ItemParent:
    cursor: ParentCursor
    fps: FpReader


class _DryWriter:
    """Stands in for ChunkWriter in --dry-run: remembers ids, writes nothing."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.seen: dict[bytes, int] = {}  # id → sealed size: what a real run would store

    def known(self, cid: bytes) -> bool:
        return cid in self.seen or cid in self.repo.index

    def add(self, cid: bytes, blob: Sealed | bytes | bytearray, plain: int) -> bool:
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
        # block fingerprints and deltas: format version 2 only
        self.fp = Fingerprinter(repo.key.id_key) if repo.format_version >= 2 else None
        self.parent = opts.parent if self.fp is not None else None

    # --- per chunk ---------------------------------------------------------------

    def _seal(self, data: bytes | bytearray) -> tuple[bytes, Sealed | None]:
        cid = self.repo.id_hash(data)
        if self.writer.known(cid):
            return cid, None
        # as buffers: the pack is written from them, the chunk's bytes are not copied
        return cid, self.repo.codec.seal_chunk(cid, data)

    def _present(self, records: list[Record]) -> bool:
        """Whether every chunk the records need is in the repository (a damaged parent
        is not built upon)."""
        idx = self.repo.index
        for _, _, cid, delta in records:
            for c in delta.chunk_ids() if delta is not None else [cid] if cid else []:
                if c not in idx:
                    return False
        return True

    def _encode(self, data: bytes | bytearray, length: int, pwin: list[Record] | None,
                pfps: bytes | None, want_fps: bool) -> _Window:
        """A window read in full: dedup, the parent's extent, a delta, or a new chunk.
        ``want_fps``: the item keeps block fingerprints (fixed windows on 4 KiB blocks)."""
        fps = None
        ids = self.repo.id_hash
        if isinstance(ids, BlockIdHasher):
            # version 3: one pass gives the block digests, the id and the fingerprints
            digests = ids.digests(data)
            cid = ids.from_digests(digests, len(data))
            if self.fp is not None and want_fps:
                fps = self.fp.from_digests(digests)
        else:
            cid = ids(data)
            if self.fp is not None and want_fps:
                same = pwin is not None and pfps is not None and pwin[0][2] == cid
                fps = pfps if same else self.fp.blocks(data)
        if self.writer.known(cid):
            return _Window([(DATA, length, cid, None)], [(cid, None, length)], fps)
        if pwin is not None and pfps is not None and fps is not None:
            diff = changed_blocks(fps, pfps)
            if not len(diff) and self._present(pwin):
                return _Window(pwin, fps=fps, parent=True)
            mv = memoryview(data)
            w = self._delta(pwin, length, diff, lambda i: mv[i * BLOCK : (i + 1) * BLOCK], fps)
            if w is not None:
                return w
        return _Window([(DATA, length, cid, None)],
                       [(cid, self.repo.codec.seal_chunk(cid, data), length)], fps)

    def _delta(self, pwin: list[Record], length: int, diff: np.ndarray,
               get_block: Callable[[int], bytes | memoryview], fps: bytes) -> _Window | None:
        """A delta extent over the parent's window, or None when it would not pay."""
        assert self.fp is not None
        if len(pwin) != 1 or pwin[0][0] not in (DATA, DELTA):
            return None  # nothing to build on: zero or unused in the parent
        prec = pwin[0]
        _, plen, pcid, pdelta = prec
        nblocks = -(-length // BLOCK)
        if plen != length or len(diff) > MAX_CHANGED_FRACTION * nblocks:
            return None
        base, patches = (pdelta.base, pdelta.patches) if pdelta else (pcid, ())
        spans = (pdelta.spans or (1,) * len(patches)) if pdelta else ()
        if base is None or not self._present(pwin):
            return None
        blocks: dict[int, bytes | memoryview] = {int(i): get_block(int(i)) for i in diff}
        span = 1
        if len(patches) >= MAX_DEPTH:
            # a full chain: fold the newest run of patches into the new one (their blocks
            # that did not change again are still the window's content)
            m = merge_span(spans)
            try:
                merged: dict[int, bytes | memoryview] = {}
                for p in patches[-m:]:
                    merged.update(patch_blocks(self.repo.get_chunk(p)))
            except (IntegrityError, ObjectMissing):
                return None
            merged.update(blocks)
            blocks, span = merged, sum(spans[-m:]) + 1
            patches, spans = patches[:-m], spans[:-m]
        if len(blocks) > MAX_CHANGED_FRACTION * nblocks:
            return None
        order = np.array(sorted(blocks), dtype=np.int64)
        patch = encode_patch(length, order, lambda i: blocks[i])
        pid = self.repo.id_hash(patch)
        blob = None if self.writer.known(pid) else self.repo.codec.seal_chunk(pid, patch)
        d = Delta(base, (*patches, pid), self.fp.full_id(fps, length), (*spans, span))
        return _Window([(DELTA, length, None, d)], [(pid, blob, len(patch))], fps,
                       delta_blocks=len(diff))

    def _take(self, w: _Window, extents: Extents, istats: dict, fps_out: bytearray | None,
              item: Item) -> None:
        for kind, length, cid, delta in w.records:
            extents.append(kind, length, cid, delta)
            self.stats.chunks += kind in (DATA, DELTA)
        length = sum(r[1] for r in w.records)
        if w.parent:
            istats["dedup"] += length
            self.stats.dedup += length
        for cid, blob, plain in w.blobs:
            if blob is not None and self.writer.add(cid, blob, plain):
                self.stats.new_chunks += 1
                self.stats.new_plain += plain
                self.stats.new_stored += len(blob)
            elif w.delta_blocks < 0:
                self.stats.dedup += plain
                istats["dedup"] += plain
        if w.delta_blocks >= 0:
            self.stats.delta += length
            self.stats.delta_blocks += w.delta_blocks
            istats["delta"] = istats.get("delta", 0) + length
            istats["delta_blocks"] = istats.get("delta_blocks", 0) + w.delta_blocks
        if fps_out is not None:
            assert w.fps is not None
            fps_out += w.fps
            chunk = FP_CHUNK_BLOCKS * FP_LEN
            while len(fps_out) >= chunk:
                self._store_fps(item, bytes(fps_out[:chunk]))
                del fps_out[:chunk]

    def _store_fps(self, item: Item, data: bytes) -> None:
        cid, blob = self._seal(data)
        if blob is not None and self.writer.add(cid, blob, len(data)):
            self.stats.fingerprints += len(blob)
        if blob is not None and not self.opts.dry_run:
            self.repo.cache.keep_fp_blob(self.repo.store, cid, bytes(blob))
        if item.fingerprints is None:
            item.fingerprints = []
        item.fingerprints.append(cid)

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

    def _item_parent(self, item: Item, content: Content, params: ChunkerParams
                     ) -> _ItemParent | None:
        if self.parent is None or not isinstance(content, SeekableContent):
            return None
        p = self.parent.item_for(item.path, content.size)
        if p is None or not p.fingerprints or p.disk_offset != item.disk_offset:
            return None
        return _ItemParent(ParentCursor(p), FpReader(p.fingerprints,
                                                     self.repo.get_cached_chunk))

    def _add_content(self, item: Item, content: Content, params: ChunkerParams) -> None:
        extents = Extents()
        istats = {"dedup": 0}
        queue: deque[Future | _Window] = deque()
        busy = 0  # data pieces in flight: bounds memory to max_inflight chunks
        before = ReadStats(**asdict(content.stats))
        chunker = make_chunker(params, self.repo.chunker_seed)
        # fingerprints need windows that start on 4 KiB blocks
        aligned = (self.fp is not None and params.algo == "fixed"
                   and params.size % BLOCK == 0 and params.header % BLOCK == 0
                   and isinstance(content, SeekableContent))
        fps_out = bytearray() if aligned else None
        ip = self._item_parent(item, content, params) if aligned else None
        changed = self.opts.changed
        if changed is not None:
            changed = self._changed_for(item, content, changed, ip)
        size = 0
        for w in self._windows(content, chunker, ip, changed):
            if isinstance(w, tuple):  # (data, length, pwin, pfps): encode in a worker
                data, length, pwin, pfps = w
                queue.append(self.pool.submit(self._encode, data, length, pwin, pfps,
                                              fps_out is not None))
                busy += 1
                size += length
            else:
                queue.append(w)
                size += sum(r[1] for r in w.records)
            while busy >= self.max_inflight or (queue and isinstance(queue[0], _Window)):
                entry = queue.popleft()
                if isinstance(entry, Future):
                    busy -= 1
                    entry = entry.result()
                self._take(entry, extents, istats, fps_out, item)
            self._tick(size)
        while queue:
            entry = queue.popleft()
            self._take(entry.result() if isinstance(entry, Future) else entry, extents, istats,
                       fps_out, item)
        if fps_out:
            self._store_fps(item, bytes(fps_out))
        self._finish_item(item, content, extents, istats, before, size)

    def _changed_for(self, item: Item, content: Content, changed: ChangedRanges,
                     ip: _ItemParent | None) -> ChangedRanges:
        if item.disk_offset is not None and content.size is not None:
            changed = changed.shifted(item.disk_offset, content.size)
        elif self.parent is not None:
            changed.check(content.size or 0, self.parent.name, item.path)
        if ip is None:
            raise UsageError(f"--changed-extents: {item.path}: the parent archive has no "
                             "matching item with block fingerprints to take the unchanged "
                             "ranges from")
        return changed

    def _windows(self, content: Content, chunker, ip: _ItemParent | None,
                 changed: ChangedRanges | None):
        """Per window: a finished _Window, or (data, length, parent window, parent
        fingerprints) to encode in a worker."""
        fp = self.fp
        if changed is None or ip is None:
            off = 0
            for kind, length, data in content.pieces(chunker):
                pwin, pfps = self._parent_window(ip, off, length)
                off += length
                if kind == DATA:
                    assert data is not None
                    yield data, length, pwin, pfps
                else:
                    yield _Window([(kind, length, None, None)],
                                  fps=fp.zeros(length) if fp is not None else None)
            return
        assert isinstance(content, SeekableContent) and fp is not None
        for a, b in chunker.windows(content.size):
            pwin, pfps = self._parent_window(ip, a, b - a)
            blocks = changed.blocks_in(a, b)
            if pwin is not None and pfps is not None and self._present(pwin):
                if not blocks:
                    self.stats.parent += b - a
                    yield _Window(pwin, fps=pfps, parent=True)
                    continue
                w = self._partial(content, a, b, blocks, pwin, pfps)
                if w is not None:
                    yield w
                    continue
            kind, length, data = content.read_window(a, b)
            if kind == DATA:
                assert data is not None
                yield data, length, pwin, pfps
            else:
                yield _Window([(kind, length, None, None)], fps=fp.zeros(length))

    def _parent_window(self, ip: _ItemParent | None, off: int, length: int
                       ) -> tuple[list[Record] | None, bytes | None]:
        """The parent's records at this window and their fingerprints (None, None when
        the parent's extents do not line up with this window)."""
        if ip is None:
            return None, None
        pwin = ip.cursor.window(off, off + length)
        if pwin is None:
            return None, None
        return pwin, ip.fps.get(off // BLOCK, -(-length // BLOCK))

    def _partial(self, content: SeekableContent, a: int, b: int, blocks: list[int],
                 pwin: list[Record], pfps: bytes) -> _Window | None:
        """Read only the listed blocks of a window whose parent is one chunk or delta;
        None when the window must be read whole (too many changes, chain too long)."""
        assert self.fp is not None
        if len(pwin) != 1 or pwin[0][0] not in (DATA, DELTA):
            return None
        length = b - a
        got: dict[int, bytes] = {}
        fps = bytearray(pfps)
        for i in blocks:
            n = min(BLOCK, length - i * BLOCK)
            buf = bytearray(n)
            _pread_into(content.fd, memoryview(buf), content.start + a + i * BLOCK,
                        content.what)
            content.stats.read += n
            got[i] = bytes(buf)
            fps[i * FP_LEN : (i + 1) * FP_LEN] = self.fp.blocks(buf)
        diff = changed_blocks(bytes(fps), pfps)
        self.stats.parent += length - len(blocks) * BLOCK
        if not len(diff):
            return _Window(pwin, fps=bytes(fps), parent=True)
        return self._delta(pwin, length, diff, lambda i: got[i], bytes(fps))

    def _finish_item(self, item: Item, content: Content, extents: Extents, istats: dict,
                     before: ReadStats, size: int) -> None:
        s = content.stats
        item.size = size
        item.extents = extents
        item.stats = {"read": s.read - before.read, "zero": s.zero - before.zero,
                      "unused": s.unused - before.unused, **istats}
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
            for kind, length, cid, delta in item.extents.records() if item.extents else ():
                if delta is not None:  # its base and patches
                    ids: list[tuple[bytes, int]] = [(c, 0) for c in delta.chunk_ids()]
                elif kind == DATA and cid is not None:
                    ids = [(cid, length)]
                else:
                    continue
                for c, n in ids:
                    loc = self.repo.index.get(c)
                    size = loc.length if loc is not None else (
                        dry.stored_size(c) if dry else None)
                    total += size if size is not None else n
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
        if self.opts.source_id is not None:
            meta["source_id"] = self.opts.source_id
        if self.parent is not None:
            meta["parent"] = self.parent.name
        if extra:
            meta.update(extra)
        meta["items"] = write_item_stream(self.items, self._store_meta_chunk,
                                          self.repo.chunker_seed)
        if not self.opts.dry_run:  # commit_archive refuses a taken name under the lock
            self.repo.commit_archive(name, meta, self.writer)  # type: ignore[arg-type]
            if self.parent is not None:  # the next backup's parent is this archive
                new = {c for i in self.items for c in i.fingerprints or ()}
                self.repo.cache.drop_fp_blobs(
                    {c for i in self.parent.items.values() for c in i.fingerprints or ()} - new)
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
