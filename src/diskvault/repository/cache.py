"""A local cache per repository: the merged chunk index and immutable archive metadata.

Opening a remote repository would otherwise download every index segment and, for
``list``, every archive's metadata. The cache lives in
``$DISKVAULT_CACHE_DIR/<repo id>/`` (default ``~/.cache/diskvault``) and is validated
against the repository on every open, never trusted blindly:

- ``index``: the merged index, sealed like a repository object (aad ``cache-index``),
  with the names of the index segments it was built from, the packs those segments
  name, and the orphan packs (no segment yet) whose TOCs it holds. On open, ``index/``
  and ``packs/`` are listed (two LISTs, no GET): new segments are downloaded and
  merged, new orphan packs read by their TOC. If a cached segment or any pack the
  cached index points into is gone (``compact``, ``check --repair``), the index is
  rebuilt from scratch: the first location of a chunk wins in a merged index, so
  after removals only a fresh merge says where a chunk still is.
- ``fingerprints/<chunk id>``: the sealed chunks of the block-fingerprint streams of
  the newest archive of each source this host backed up (archive/delta.py), so the next
  backup compares blocks without a download; authenticated on use like any chunk.
  Remote stores only.
- ``archives/<id>``: sealed archive metadata blobs exactly as stored (immutable, named
  by a random id), so reading them from the cache still authenticates them. Only for
  remote stores: a local directory is read as fast as the cache, and then ``list`` and
  ``extract`` keep seeing (and authenticating) the repository's own copy.

A damaged or foreign cache file is ignored and rebuilt: the repository stays the truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from ..errors import IntegrityError, ObjectMissing
from ..storage.base import Store
from .index import ChunkIndex
from .objects import ObjectCodec
from .pack import read_toc
from .security import cache_dir

CACHE_AAD = b"cache-index"
CACHE_VERSION = 2


def _write_atomic(path: str, data: bytes | bytearray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # a read-only or full cache dir only costs speed


@dataclass
class _State:
    idx: ChunkIndex = field(default_factory=ChunkIndex)
    segments: set[str] = field(default_factory=set)  # merged into idx
    segment_packs: set[str] = field(default_factory=set)  # packs those segments name
    orphans: set[str] = field(default_factory=set)  # packs read by their TOC instead


class RepoCache:
    def __init__(self, repo_id: bytes, codec: ObjectCodec, enabled: bool = True) -> None:
        self.dir = os.path.join(cache_dir(), repo_id.hex())
        self.codec = codec
        self.enabled = enabled and not os.environ.get("DISKVAULT_NO_CACHE")
        #: after load_index: packs no index segment names (their TOCs were read)
        self.orphans: set[str] = set()
        self._state: _State | None = None  # what load_index built (its index is shared)

    # --- chunk index -------------------------------------------------------------------

    def _read_index(self) -> _State | None:
        try:
            with open(os.path.join(self.dir, "index"), "rb") as f:
                blob = f.read()
            d = msgpack.unpackb(self.codec.open(CACHE_AAD, blob, "cached index"))
            if d["version"] != CACHE_VERSION:
                return None
            return _State(ChunkIndex.from_bytes(d["index"], "cached index"),
                          set(d["segments"]), set(d["segment_packs"]), set(d["orphans"]))
        except (OSError, IntegrityError, KeyError, ValueError, TypeError,
                msgpack.UnpackException):
            return None

    def _write_index(self, st: _State) -> None:
        data = msgpack.packb({"version": CACHE_VERSION, "index": st.idx.to_bytes(),
                              "segments": sorted(st.segments),
                              "segment_packs": sorted(st.segment_packs),
                              "orphans": sorted(st.orphans)})
        _write_atomic(os.path.join(self.dir, "index"), self.codec.seal(CACHE_AAD, data))

    def load_index(self, store: Store, load_segment: Callable[[str], ChunkIndex],
                   problems: list[str] | None = None) -> ChunkIndex:
        """The repository's chunk index, downloading only what the cache lacks.

        ``load_segment`` raises ObjectMissing (merged away meanwhile: skipped) or
        IntegrityError (damaged: reported in ``problems``, its packs then count as
        orphans, and it is tried again next time). Entries naming a pack that is not
        listed are dropped, so neither a reader nor dedup is sent to missing data.
        """
        segments = {name for name, _ in store.list("index")}
        packs = {key.rsplit("/", 1)[-1]: size for key, size in store.list("packs")}
        st = self._read_index() if self.enabled else None
        if st is None or not st.segments <= segments or not st.idx.pack_names() <= packs.keys():
            st = _State()
        changed = False
        for name in sorted(segments - st.segments):
            try:
                seg = load_segment(name)
            except ObjectMissing:
                continue  # merged into a newer segment meanwhile: that one is listed too
            except IntegrityError as e:
                if problems is not None:
                    problems.append(str(e))
                continue
            st.idx.update(seg)
            st.segment_packs |= seg.pack_names()
            st.segments.add(name)
            changed = True
        # a segment naming a pack that is gone (a damaged repository): never point there
        st.idx.remove_packs(st.idx.pack_names() - packs.keys())
        orphans = packs.keys() - st.segment_packs
        for pack in sorted(orphans - st.orphans):
            try:
                for entry in read_toc(store.load, pack, packs[pack], self.codec):
                    st.idx.add(entry.id, pack, entry.offset, entry.length, entry.plain_size)
            except (IntegrityError, ObjectMissing) as e:
                orphans.discard(pack)  # unreadable: only garbage; check reports it
                if problems is not None:
                    problems.append(str(e))
                continue
            changed = True
        changed |= st.orphans != orphans
        st.orphans = orphans
        self.orphans = set(orphans)
        self._state = st
        if self.enabled and changed:
            self._write_index(st)
        return st.idx

    def add_segment(self, name: str, segment: ChunkIndex, idx: ChunkIndex) -> None:
        """Record a segment this process stored, whose entries ``idx`` (the index
        load_index returned, added to since) already holds."""
        st = self._state
        if st is None or st.idx is not idx:
            return  # not the index we built: the next load_index fetches the segment
        st.segments.add(name)
        st.segment_packs |= segment.pack_names()
        st.orphans -= st.segment_packs
        if self.enabled:
            self._write_index(st)

    # --- archive metadata --------------------------------------------------------------

    def _archive_path(self, archive_id: bytes) -> str:
        return os.path.join(self.dir, "archives", archive_id.hex())

    def archive_blob(self, store: Store, archive_id: bytes) -> bytes:
        """The sealed metadata of an archive: from the cache, else stored and cached."""
        if not (self.enabled and store.remote):
            return store.load(f"archives/{archive_id.hex()}")
        path = self._archive_path(archive_id)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            pass
        blob = store.load(f"archives/{archive_id.hex()}")
        _write_atomic(path, blob)
        return blob

    # --- block fingerprints ------------------------------------------------------------

    def fp_blob(self, store: Store, chunk_id: bytes) -> bytes | None:
        if not (self.enabled and store.remote):
            return None
        try:
            with open(os.path.join(self.dir, "fingerprints", chunk_id.hex()), "rb") as f:
                return f.read()
        except OSError:
            return None

    def keep_fp_blob(self, store: Store, chunk_id: bytes, blob: bytes) -> None:
        if self.enabled and store.remote:
            _write_atomic(os.path.join(self.dir, "fingerprints", chunk_id.hex()), blob)

    def drop_fp_blobs(self, ids: set[bytes]) -> None:
        """Forget fingerprint chunks a newer archive superseded: the cache holds about one
        fingerprint stream per backed-up source."""
        for i in ids:
            try:
                os.unlink(os.path.join(self.dir, "fingerprints", i.hex()))
            except OSError:
                pass

    def forget_archive(self, archive_id: bytes) -> None:
        """Drop one cached blob (it failed to authenticate: read the repository's)."""
        try:
            os.unlink(self._archive_path(archive_id))
        except OSError:
            pass

    def prune_archives(self, keep: set[bytes]) -> None:
        """Drop cached metadata of archives the manifest no longer names."""
        if not self.enabled:
            return
        try:
            names = os.listdir(os.path.join(self.dir, "archives"))
        except OSError:
            return
        wanted = {i.hex() for i in keep}
        for n in names:
            if n not in wanted:
                try:
                    os.unlink(os.path.join(self.dir, "archives", n))
                except OSError:
                    pass
