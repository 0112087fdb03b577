"""Writing chunks: fill packs, upload full packs in the background, index what landed.

Only the caller's thread calls ``add``; uploads run on a small pool so that a slow
store (S3, SFTP) overlaps with reading and compressing. A chunk is entered in the
index only after its pack is durable, so the index never points at missing data.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..crypto.aead import Buffer
from .index import ChunkIndex
from .objects import Sealed
from .pack import PackEntry, PackWriter, pack_key

if TYPE_CHECKING:
    from .repo import Repository


class ChunkWriter:
    def __init__(self, repo: Repository, upload_threads: int = 2) -> None:
        self.repo = repo
        self.upload_threads = max(1, upload_threads)
        # a pool smaller than the threads would only make them queue for connections
        repo.store.reserve_connections(self.upload_threads)
        # what writers killed earlier left behind (a pack each); never a live writer's
        repo.store.temporaries(remove=True)
        self.pool = ThreadPoolExecutor(self.upload_threads, thread_name_prefix="upload")
        self.pack = PackWriter(repo.pack_size)
        self.pending: set[bytes] = set()  # in the open pack or being uploaded
        self.uploads: deque[tuple[Future, list[PackEntry], int]] = deque()
        self.session_index = ChunkIndex()
        self.packs_written = 0
        self.bytes_written = 0

    def known(self, chunk_id: bytes) -> bool:
        return chunk_id in self.pending or chunk_id in self.repo.index

    def add(self, chunk_id: bytes, blob: Buffer | Sealed, plain_size: int) -> bool:
        """Queue a sealed chunk; False if it was already stored (nothing written)."""
        if self.known(chunk_id):
            return False
        self.pack.add(chunk_id, blob, plain_size)
        self.pending.add(chunk_id)
        if self.pack.full:
            self._ship()
        return True

    def _ship(self) -> None:
        if not len(self.pack):
            return
        # the pack was hashed (named) as chunks were added: the upload thread only
        # writes, from the chunks' own buffers (no 32 MiB join)
        name, parts, size, entries = self.pack.finish_parts(self.repo.codec)
        fut = self.pool.submit(self._upload, name, parts)
        self.uploads.append((fut, entries, size))
        # bound memory: one pack being filled plus one per upload thread
        while len(self.uploads) > self.upload_threads:
            self._reap_one()

    def _upload(self, name: str, parts: list[Buffer]) -> str:
        self.repo.store.store_parts(pack_key(name), parts)
        return name

    def _reap_one(self) -> None:
        fut, entries, size = self.uploads.popleft()
        name = fut.result()  # raises the storage error of a failed upload
        for e in entries:
            self.repo.index.add(e.id, name, e.offset, e.length, e.plain_size)
            self.session_index.add(e.id, name, e.offset, e.length, e.plain_size)
            self.pending.discard(e.id)
        self.packs_written += 1
        self.bytes_written += size

    def flush(self) -> None:
        """Make every added chunk durable and indexed in memory."""
        self._ship()
        while self.uploads:
            self._reap_one()

    def commit(self) -> None:
        """Flush, then write this session's index segment (durable before any metadata)."""
        self.flush()
        if len(self.session_index):
            name = self.repo.write_index_segment(self.session_index)
            # this host's cache takes the segment it wrote: the next command on this
            # host then downloads only what other hosts added
            self.repo.cache.add_segment(name, self.session_index, self.repo.index)
            self.session_index = ChunkIndex()

    def close(self) -> None:
        # on error paths: wait for running uploads so no thread outlives the repository
        for fut, *_ in self.uploads:
            fut.cancel()
        self.pool.shutdown(wait=True)
