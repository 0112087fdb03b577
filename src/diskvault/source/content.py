"""Reading an item's content as pieces: ``(kind, length, data)`` in order.

Seekable content (files, block devices, byte ranges of disks) with a fixed chunker is
cut into windows at fixed offsets; in each window only the bytes that are both data
(SEEK_DATA/SEEK_HOLE) and used (block map) are read, the rest is zero-filled without
reading. A window with nothing to read becomes a zero or unused piece. All-zero data
becomes a zero piece. Streams (stdin, FIFOs, commands) go through the chunker as is.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..blockmap.base import BlockMap
from ..chunking.base import Chunker
from ..errors import SourceError

# piece (and extent) kinds; archive/model.py stores them as extent kinds
DATA, ZERO, UNUSED = 0, 1, 2

Piece = tuple[int, int, "bytes | bytearray | None"]

_zero_cache: dict[int, bytes] = {}


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """memcmp against a cached zero buffer (≈ 30 GB/s; no per-byte Python work)."""
    n = len(buf)
    z = _zero_cache.get(n)
    if z is None:
        if len(_zero_cache) > 16:
            _zero_cache.clear()
        z = _zero_cache[n] = bytes(n)
    return buf == z


@dataclass
class ReadStats:
    read: int = 0  # bytes actually read from the source
    zero: int = 0  # all-zero data or holes: not stored
    unused: int = 0  # free filesystem space: not read, not stored
    holes: int = 0  # part of zero: holes that were never read

    def add(self, other: ReadStats) -> None:
        self.read += other.read
        self.zero += other.zero
        self.unused += other.unused
        self.holes += other.holes


class Content(Protocol):
    @property
    def size(self) -> int | None: ...  # read-only here: SeekableContent narrows it to int

    stats: ReadStats

    def pieces(self, chunker: Chunker) -> Iterator[Piece]: ...


def _pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as e:
            raise SourceError(f"{what}: read error at byte {offset + got}: {e.strerror}") from None
        if n == 0:
            raise SourceError(f"{what}: unexpected end of data at byte {offset + got} "
                              "(did it shrink while being read?)")
        got += n


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if e > s:
            out.append((s, e - s))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


@dataclass
class SeekableContent:
    """Bytes ``[start, start+size)`` of an open file or device."""

    fd: int
    size: int
    start: int = 0
    what: str = ""
    blockmap: BlockMap | None = None
    holes: bool = True  # try SEEK_DATA/SEEK_HOLE
    stats: ReadStats = field(default_factory=ReadStats)

    def data_ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        """Non-hole ranges of ``[a, b)`` (item offsets)."""
        if not self.holes:
            return [(a, b - a)]
        out, pos = [], a
        while pos < b:
            try:
                d = os.lseek(self.fd, self.start + pos, os.SEEK_DATA) - self.start
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: a hole, or did it shrink?
                    self._check_size(b)
                    break
                self.holes = False  # device or filesystem without hole support
                return [(a, b - a)]
            if d >= b:
                break
            h = os.lseek(self.fd, self.start + d, os.SEEK_HOLE) - self.start
            out.append((d, min(h, b) - d))
            pos = h
        return out

    def _check_size(self, end: int) -> None:
        """A file that shrank while read would otherwise be stored with invented zeros."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_size < self.start + end:
            raise SourceError(f"{self.what}: file shrank while being read "
                              f"({st.st_size} bytes now, {self.start + self.size} expected)")

    def present(self, a: int, b: int) -> tuple[list[tuple[int, int]], bool]:
        """Ranges of ``[a, b)`` that must be read, and whether the rest is unused space."""
        ranges = self.data_ranges(a, b)
        if self.blockmap is None or not ranges:
            return ranges, False
        used = self.blockmap.used_ranges(a, b)
        return _intersect(ranges, used), sum(n for _, n in used) < b - a

    def read_window(self, a: int, b: int) -> Piece:
        n = b - a
        ranges, has_unused = self.present(a, b)
        got = sum(ln for _, ln in ranges)
        if not ranges:
            kind = UNUSED if has_unused else ZERO
            if kind == UNUSED:
                self.stats.unused += n
            else:
                self.stats.zero += n
                self.stats.holes += n
            return kind, n, None
        buf: bytes | bytearray = b""
        if got == n:  # the common case, all data: one pread into a new, unzeroed buffer
            try:
                buf = os.pread(self.fd, n, self.start + a)
            except OSError:
                pass  # retried below, where the error is reported with its offset
        if len(buf) != n:  # holes to leave zero, a short read, an error
            buf = bytearray(n)
            view = memoryview(buf)
            for off, ln in ranges:
                _pread_into(self.fd, view[off - a : off - a + ln], self.start + off, self.what)
        self.stats.read += got
        skipped = n - got
        if has_unused:
            self.stats.unused += skipped
        else:
            self.stats.holes += skipped
            self.stats.zero += skipped
        if is_zero(buf):
            self.stats.zero += got
            return ZERO, n, None
        return DATA, n, buf

    def pieces(self, chunker: Chunker) -> Iterator[Piece]:
        if chunker.fixed:
            for a, b in chunker.windows(self.size):
                yield self.read_window(a, b)
            return
        # content-defined chunking needs the byte stream: zero-fill what is not read
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            n = min(n, self.size - pos, 8 << 20)
            if n <= 0:
                return b""
            kind, _, data = self.read_window(pos, pos + n)
            pos += n
            return bytes(n) if data is None else bytes(data)

        # stats of zero/unused were counted by read_window; the chunk loop adds no more
        for chunk in chunker.chunks(read):
            if is_zero(chunk):
                yield ZERO, len(chunk), None
            else:
                yield DATA, len(chunk), chunk


@dataclass
class StreamContent:
    """A byte stream of unknown size: stdin, a FIFO, a character device, a command."""

    read: object  # Callable[[int], bytes]
    what: str = ""
    size: int | None = None
    stats: ReadStats = field(default_factory=ReadStats)

    def pieces(self, chunker: Chunker) -> Iterator[Piece]:
        total = 0
        try:
            for chunk in chunker.chunks(self.read):  # type: ignore[arg-type]
                total += len(chunk)
                self.stats.read += len(chunk)
                if is_zero(chunk):
                    self.stats.zero += len(chunk)
                    yield ZERO, len(chunk), None
                else:
                    yield DATA, len(chunk), chunk
        except OSError as e:
            raise SourceError(f"{self.what}: read error: {e.strerror}") from None
        self.size = total
