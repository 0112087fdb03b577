"""A local cache per repository: the merged chunk index and immutable archive metadata.

Opening a remote repository would otherwise download every index segment and, for
``list``, every archive's metadata. The cache lives in
``$DISKVAULT_CACHE_DIR/<repo id>/`` (default ``~/.cache/diskvault``) and is validated
against the repository on every open, never trusted blindly:

- ``index``: the merged index, sealed like a repository object (aad ``cache-index``),
  with the names of the index segments and orphan packs it was built from. On open,
  the segment names are listed (one LIST): new segments are downloaded and merged;
  if any cached segment is gone (``compact`` merged or removed it), the index is
  rebuilt from scratch, since its packs may be gone too. Orphan packs (no segment
  yet) are found by listing packs/ and read by their TOC once.
- ``archives/<id>``: sealed archive metadata blobs exactly as stored (immutable, named
  by id), so reading them from the cache still authenticates them.

A damaged or foreign cache file is ignored and rebuilt: the repository stays the truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import msgpack

from ..errors import IntegrityError, ObjectMissing
from ..storage.base import Store
from .index import ChunkIndex
from .objects import ObjectCodec
from .pack import read_toc
from .security import cache_dir

CACHE_AAD = b"cache-index"
CACHE_VERSION = 1


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


class RepoCache:
    def __init__(self, repo_id: bytes, codec: ObjectCodec, enabled: bool = True) -> None:
        self.dir = os.path.join(cache_dir(), repo_id.hex())
        self.codec = codec
        self.enabled = enabled and not os.environ.get("DISKVAULT_NO_CACHE")

    # --- chunk index -------------------------------------------------------------------

    def _read_index(self) -> tuple[ChunkIndex, set[str], set[str]] | None:
        try:
            with open(os.path.join(self.dir, "index"), "rb") as f:
                blob = f.read()
            d = msgpack.unpackb(self.codec.open(CACHE_AAD, blob, "cached index"))
            if d["version"] != CACHE_VERSION:
                return None
            return (ChunkIndex.from_bytes(d["index"], "cached index"),
                    set(d["segments"]), set(d["orphans"]))
        except (OSError, IntegrityError, KeyError, ValueError, TypeError,
                msgpack.UnpackException):
            return None

    def _write_index(self, idx: ChunkIndex, segments: set[str], orphans: set[str]) -> None:
        data = msgpack.packb({"version": CACHE_VERSION, "index": idx.to_bytes(),
                              "segments": sorted(segments), "orphans": sorted(orphans)})
        _write_atomic(os.path.join(self.dir, "index"), self.codec.seal(CACHE_AAD, data))

    def load_index(self, store: Store, load_segment: Callable[[str], ChunkIndex],
                   problems: list[str] | None = None) -> ChunkIndex:
        """The repository's chunk index, downloading only what the cache lacks."""
        segments = {name for name, _ in store.list("index")}
        cached = self._read_index() if self.enabled else None
        if cached is not None and cached[1] <= segments:
            idx, done, orphans_done = cached
        else:
            idx, done, orphans_done = ChunkIndex(), set(), set()
        for name in sorted(segments - done):
            try:
                idx.update(load_segment(name))
            except ObjectMissing:
                continue  # merged into a newer segment meanwhile: that one is listed too
            done.add(name)
        covered = idx.pack_names()
        orphans: set[str] = set()
        for key, size in list(store.list("packs")):
            pack = key.rsplit("/", 1)[-1]
            if pack in covered:
                continue
            orphans.add(pack)
            if pack in orphans_done:
                continue
            try:
                for e in read_toc(store.load, pack, size, self.codec):
                    idx.add(e.id, pack, e.offset, e.length, e.plain_size)
            except (IntegrityError, ObjectMissing) as e:
                orphans.discard(pack)  # unreadable: only garbage; check reports it
                if problems is not None:
                    problems.append(f"pack {pack[:16]}: {e}")
        if orphans_done - orphans:
            # an orphan pack vanished (compact removed it): its entries must go too
            idx.remove_packs(orphans_done - orphans)
        if self.enabled:
            self._write_index(idx, done, orphans)
        return idx

    def invalidate(self) -> None:
        try:
            os.unlink(os.path.join(self.dir, "index"))
        except OSError:
            pass

    # --- archive metadata --------------------------------------------------------------

    def archive_blob(self, store: Store, archive_id: bytes) -> bytes:
        name = f"archives/{archive_id.hex()}"
        path = os.path.join(self.dir, name)
        if self.enabled:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                pass
        blob = store.load(name)
        if self.enabled:
            _write_atomic(path, blob)
        return blob
