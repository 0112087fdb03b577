"""Restoring content, shared by every restore path: fetch and decode chunks in
parallel (``iter_pieces``), write them in order through a sink.

(``restore.py`` builds on this: ``extract`` into a directory or to stdout.)

Sinks: a stream (stdout: zeros are written out), a regular file (``sparse``: holes for
zero/unused runs and for all-zero 64 KiB blocks inside chunks — skipped in a file we
just created, punched in an existing one), or a block device (zero runs written as
zeros or BLKZEROOUT). A chunk that is missing or fails authentication is an error
naming the item and byte range — never silent zeros — unless the caller collects
damage (``--continue-on-error``): then the range becomes zeros and is reported.
"""

from __future__ import annotations

import ctypes
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
from ..source.content import DATA, ZERO
from .delta import combine
from .model import Item

ZERO_BUF = bytes(4 << 20)
SPARSE_BLOCK = 64 << 10
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


@dataclass(frozen=True)
class Damage:
    """A range of an item that could not be restored and was written as zeros."""

    path: str
    first: int  # first and last byte, within the item
    last: int
    chunk_id: bytes
    why: str

    def __str__(self) -> str:
        return (f"{self.path}: bytes {self.first}-{self.last} unreadable (chunk "
                f"{self.chunk_id.hex()}): written as zeros; {self.why}")


@dataclass
class Piece:
    item: Item
    offset: int  # within the item
    kind: int
    length: int
    data: bytes | None


def damage_lines(damage: list[Damage]) -> list[str]:
    """One line per damaged range and a summary (the warnings of --continue-on-error)."""
    if not damage:
        return []
    n = sum(d.last - d.first + 1 for d in damage)
    return [str(d) for d in damage] + [
        f"{len(damage)} damaged range(s), {n} bytes, restored as zeros; everything else "
        "was restored"]


_Pending = tuple[Item, int, int, int, "bytes | None", "list[Future]"]


def iter_pieces(repo: Repository, items: Iterable[Item], workers: int = 2,
                prefetch: int = 8, damage: list[Damage] | None = None) -> Iterator[Piece]:
    """Yield the content of ``items`` in order, with chunks fetched ahead in parallel.

    With a ``damage`` list, a chunk that cannot be read becomes a zero piece and is
    recorded there; without, it raises IntegrityError naming the range. A delta extent's
    base and patches are fetched in parallel like any chunks and combined
    (delta.combine) when its turn comes; its piece is a data piece.
    """
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fetch")
    queue: deque[_Pending] = deque()
    try:
        for item in items:
            if item.extents is None:
                continue
            off = 0
            for kind, length, cid, delta in item.extents.records():
                ids = delta.chunk_ids() if delta is not None else [cid] if cid else []
                futs = [pool.submit(repo.get_chunk, c) for c in ids]
                if delta is not None:  # named by its full-content id in damage reports
                    kind, cid = DATA, delta.full
                queue.append((item, off, kind, length, cid, futs))
                off += length
                while len(queue) > prefetch or (queue and not queue[0][5]):
                    yield _resolve(*queue.popleft(), damage)
            if off != item.size:  # check reports it too; a restore never passes it as right
                raise IntegrityError(f"{item.path}: extents cover {off} bytes, the item "
                                     f"has {item.size}: cannot be restored")
        while queue:
            yield _resolve(*queue.popleft(), damage)
    finally:
        for *_, futs in queue:
            for fut in futs:
                fut.cancel()
        pool.shutdown(wait=True)


def _resolve(item: Item, off: int, kind: int, length: int, cid: bytes | None,
             futs: list[Future], damage: list[Damage] | None) -> Piece:
    if not futs:
        return Piece(item, off, kind, length, None)
    last = off + length - 1
    try:
        parts = [f.result() for f in futs]
        data = parts[0] if len(parts) == 1 else combine(length, parts[0], parts[1:])
        if len(data) != length:
            raise IntegrityError("chunk size mismatch")
    except (ObjectMissing, IntegrityError) as e:
        if damage is None:
            raise IntegrityError(f"{item.path}: bytes {off}-{last} cannot be restored: {e}"
                                 ) from None
        damage.append(Damage(item.path, off, last, cid or b"", str(e)))
        return Piece(item, off, ZERO, length, None)
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
    """Writes one item into a regular file or block device at ``base`` + item offset.

    ``sparse`` (regular files): zero runs and all-zero 64 KiB blocks become holes —
    skipped in a ``fresh`` file (created for this restore, so all holes already),
    punched in an existing one, whose old bytes would otherwise show through.
    """

    def __init__(self, fd: int, what: str, sparse: bool, base: int = 0,
                 fresh: bool = True) -> None:
        self.fd = fd
        self.what = what
        self.base = base
        self.is_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        self.sparse = sparse and not self.is_device
        self.fresh = fresh

    def write(self, piece: Piece) -> None:
        pos = self.base + piece.offset
        if piece.data is None:
            self.blank(pos, piece.length)
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
        done = 0  # data[:done] is written or a hole
        for s, e in zip(edges[0::2], edges[1::2], strict=True):
            a, z = int(s) * SPARSE_BLOCK, int(e) * SPARSE_BLOCK
            if a > done:
                self.hole(pos + done, a - done)
            _pwrite_all(self.fd, mv[a:z], pos + a, self.what)
            done = z
        if n * SPARSE_BLOCK > done:
            self.hole(pos + done, n * SPARSE_BLOCK - done)
        if n * SPARSE_BLOCK < len(data):
            _pwrite_all(self.fd, mv[n * SPARSE_BLOCK :], pos + n * SPARSE_BLOCK, self.what)

    def blank(self, pos: int, length: int) -> None:
        """Make a range read as zeros: a hole where sparse, zeros written otherwise."""
        if self.sparse:
            self.hole(pos, length)
        else:
            self.zero(pos, length)

    def hole(self, pos: int, length: int) -> None:
        """Make ``length`` bytes at ``pos`` a hole (a fresh file has them already)."""
        if self.fresh or not length:
            return
        if not punch_hole(self.fd, pos, length):
            self.zero(pos, length)  # a filesystem without hole punching: zeros then

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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, pos: int, length: int) -> bool:
    """Deallocate a range of a regular file (it then reads as zeros); False if the
    filesystem cannot (the caller writes zeros instead)."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, pos, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise TargetError(f"cannot punch a hole at byte {pos}: {os.strerror(err)}")


def create_file(path: str, sparse: bool) -> tuple[int, FileSink]:
    """Create a new regular file at ``path`` for writing: never an existing one.

    O_EXCL (which with O_CREAT also refuses a symlink) means the content can only go
    into an inode this call created — not into a device node, FIFO or link that an
    archive entry or anyone else put there. Callers remove what is in the way first.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise TargetError(f"{path}: cannot create: {e.strerror}") from None
    return fd, FileSink(fd, path, sparse, fresh=True)
