"""Restoring content: fetch and decode chunks in parallel, write them in order.

Sinks: a stream (stdout: zeros are written out), a regular file (``sparse``: holes for
zero/unused runs and for all-zero 64 KiB blocks inside chunks), or a block device
(zero runs written as zeros or BLKZEROOUT). A chunk that is missing or fails
authentication is an error naming the item and byte range — never silent zeros.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import IntegrityError, ObjectMissing, TargetError
from ..repository.repo import Repository
from ..source.content import DATA
from .model import Item

ZERO_BUF = bytes(4 << 20)
SPARSE_BLOCK = 64 << 10
BLKZEROOUT = 0x127F  # _IO(0x12, 127)


@dataclass
class Piece:
    item: Item
    offset: int  # within the item
    kind: int
    length: int
    data: bytes | None


def iter_pieces(repo: Repository, items: Iterable[Item], workers: int = 2,
                prefetch: int = 8) -> Iterator[Piece]:
    """Yield the content of ``items`` in order, with chunks fetched ahead in parallel."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fetch")
    queue: deque[tuple[Item, int, int, int, Future | None]] = deque()
    try:
        for item in items:
            if item.extents is None:
                continue
            off = 0
            for kind, length, cid in item.extents:
                fut = pool.submit(repo.get_chunk, cid) if kind == DATA else None
                queue.append((item, off, kind, length, fut))
                off += length
                while len(queue) > prefetch or (queue and queue[0][4] is None):
                    yield _resolve(*queue.popleft())
        while queue:
            yield _resolve(*queue.popleft())
    finally:
        for *_, fut in queue:
            if fut is not None:
                fut.cancel()
        pool.shutdown(wait=True)


def _resolve(item: Item, off: int, kind: int, length: int, fut: Future | None) -> Piece:
    if fut is None:
        return Piece(item, off, kind, length, None)
    try:
        data = fut.result()
    except (ObjectMissing, IntegrityError) as e:
        raise IntegrityError(
            f"{item.path}: bytes {off}-{off + length - 1} cannot be restored: {e}") from None
    if len(data) != length:
        raise IntegrityError(f"{item.path}: bytes {off}-{off + length - 1}: chunk size mismatch")
    return Piece(item, off, kind, length, data)


def _write_all(fd: int, data: bytes | memoryview, what: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise TargetError(f"{what}: no space left on device") from None
            if e.errno == errno.EPIPE:
                raise
            raise TargetError(f"{what}: write error: {e.strerror}") from None
        view = view[n:]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, what: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise TargetError(f"{what}: no space left on device") from None
            raise TargetError(f"{what}: write error at byte {offset}: {e.strerror}") from None
        view, offset = view[n:], offset + n


class StreamSink:
    """Writes content to a stream (stdout): zero runs as real zeros."""

    def __init__(self, fd: int, what: str = "stdout") -> None:
        self.fd = fd
        self.what = what

    def write(self, piece: Piece) -> None:
        if piece.data is not None:
            _write_all(self.fd, piece.data, self.what)
            return
        left = piece.length
        while left:
            n = min(left, len(ZERO_BUF))
            _write_all(self.fd, memoryview(ZERO_BUF)[:n], self.what)
            left -= n


class FileSink:
    """Writes one item into a regular file or block device at ``base`` + item offset."""

    def __init__(self, fd: int, what: str, sparse: bool, base: int = 0) -> None:
        self.fd = fd
        self.what = what
        self.base = base
        self.is_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        # a regular file we created is all holes: zero runs need no writing at all
        self.sparse = sparse and not self.is_device

    def write(self, piece: Piece) -> None:
        pos = self.base + piece.offset
        if piece.data is None:
            if not self.sparse:
                self.zero(pos, piece.length)
            return
        if self.sparse:
            self._write_sparse(piece.data, pos)
        else:
            _pwrite_all(self.fd, piece.data, pos, self.what)

    def _write_sparse(self, data: bytes, pos: int) -> None:
        n = len(data) // SPARSE_BLOCK
        if n < 2:
            _pwrite_all(self.fd, data, pos, self.what)
            return
        blocks = np.frombuffer(data, np.uint8, n * SPARSE_BLOCK).reshape(n, SPARSE_BLOCK)
        nonzero = blocks.any(axis=1)
        if nonzero.all():
            _pwrite_all(self.fd, data, pos, self.what)
            return
        edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
        mv = memoryview(data)
        for s, e in zip(edges[0::2], edges[1::2], strict=True):
            a, z = int(s) * SPARSE_BLOCK, int(e) * SPARSE_BLOCK
            _pwrite_all(self.fd, mv[a:z], pos + a, self.what)
        if n * SPARSE_BLOCK < len(data):
            _pwrite_all(self.fd, mv[n * SPARSE_BLOCK :], pos + n * SPARSE_BLOCK, self.what)

    def zero(self, pos: int, length: int) -> None:
        if self.is_device:
            try:  # let the device zero (or unmap) the range itself
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", pos, length))
                return
            except OSError:
                pass
        while length:
            n = min(length, len(ZERO_BUF))
            _pwrite_all(self.fd, memoryview(ZERO_BUF)[:n], pos, self.what)
            pos, length = pos + n, length - n

    def finish(self, size: int) -> None:
        if not self.is_device:
            try:
                os.ftruncate(self.fd, self.base + size)
            except OSError as e:
                raise TargetError(f"{self.what}: cannot set size: {e.strerror}") from None


def open_target(path: str, size: int, sparse: bool) -> tuple[int, FileSink]:
    """Open a file (created/truncated) or an existing block device for writing."""
    try:
        st = os.stat(path)
        is_dev = stat.S_ISBLK(st.st_mode)
    except FileNotFoundError:
        is_dev = False
    try:
        if is_dev:
            fd = os.open(path, os.O_WRONLY)
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                os.close(fd)
                raise TargetError(f"{path}: device is too small ({dev_size} bytes, "
                                  f"{size} needed)")
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise TargetError(f"{path}: cannot open for writing: {e.strerror}") from None
    return fd, FileSink(fd, path, sparse)
