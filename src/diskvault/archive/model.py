"""Archive items and their extent lists.

An item is a file, a directory entry, a device read as a file, a stdin stream, or a
region of a disk. Content items carry **extents**: runs of
``data`` (one chunk id), ``zero`` (all-zero: never hashed or stored) and ``unused``
(free space of the filesystem on it: never read) and ``delta`` (kind 3, format version 2:
a base chunk + patches of changed blocks + a full-content id; see delta.py).

Extents are kept packed (``kind u8 | length u64 [| id 32]`` each): 41 bytes per data
chunk and 9 per run of zeros, in memory and in the repository.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import msgpack

from ..errors import IntegrityError
from ..source.content import DATA, UNUSED, ZERO
from ..source.paths import (  # noqa: F401 - the entry types are part of the model
    BLOCKDEV,
    CHARDEV,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    Meta,
)
from .delta import Delta

DELTA = 3
KIND_NAMES = {DATA: "data", ZERO: "zero", UNUSED: "unused", DELTA: "delta"}
_EXT = struct.Struct("<BQ")
ID_LEN = 32
# one extent: (kind, length, chunk id of a data extent, Delta of a delta extent)
Record = tuple[int, int, "bytes | None", "Delta | None"]


class Extents:
    """Append-only packed extent list; consecutive zero/unused runs are merged."""

    __slots__ = ("buf", "_last_kind", "_last_pos")

    def __init__(self, data: bytes = b"") -> None:
        self.buf = bytearray(data)
        self._last_kind = -1
        self._last_pos = -1

    def append(self, kind: int, length: int, chunk_id: bytes | None = None,
               delta: Delta | None = None) -> None:
        if length <= 0:
            return
        if kind == DELTA:
            assert delta is not None and 1 <= len(delta.patches) <= 255
            self._last_kind, self._last_pos = kind, len(self.buf)
            self.buf += _EXT.pack(kind, length) + delta.base + bytes([len(delta.patches)])
            spans = delta.spans or (1,) * len(delta.patches)
            assert len(spans) == len(delta.patches)
            self.buf += b"".join(delta.patches) + bytes(min(255, x) for x in spans) + delta.full
            return
        if kind != DATA and kind == self._last_kind:
            _, n = _EXT.unpack_from(self.buf, self._last_pos)
            _EXT.pack_into(self.buf, self._last_pos, kind, n + length)
            return
        self._last_kind, self._last_pos = kind, len(self.buf)
        self.buf += _EXT.pack(kind, length)
        if kind == DATA:
            assert chunk_id is not None and len(chunk_id) == ID_LEN
            self.buf += chunk_id

    def __iter__(self) -> Iterator[tuple[int, int, bytes | None]]:
        """Yield ``(kind, length, chunk_id or None)``; a delta extent yields its full-content
        id (use ``records()`` to see its chunks). Raises IntegrityError if malformed."""
        for kind, length, cid, delta in self.records():
            yield kind, length, delta.full if delta is not None else cid

    def records(self) -> Iterator[Record]:
        """Yield ``(kind, length, chunk id or None, Delta or None)``."""
        mv, pos, end = memoryview(self.buf), 0, len(self.buf)
        while pos < end:
            if pos + _EXT.size > end:
                raise IntegrityError("extent list is truncated")
            kind, length = _EXT.unpack_from(mv, pos)
            pos += _EXT.size
            if kind == DATA:
                if pos + ID_LEN > end:
                    raise IntegrityError("extent list is truncated")
                yield kind, length, bytes(mv[pos : pos + ID_LEN]), None
                pos += ID_LEN
            elif kind == DELTA:
                n = mv[pos + ID_LEN] if pos + ID_LEN < end else 0
                need = ID_LEN + 1 + n * ID_LEN + n + ID_LEN
                if not 1 <= n <= 255 or pos + need > end:
                    raise IntegrityError("extent list is truncated or has a bad delta extent")
                base = bytes(mv[pos : pos + ID_LEN])
                q = pos + ID_LEN + 1
                patches = tuple(bytes(mv[q + k * ID_LEN : q + (k + 1) * ID_LEN])
                                for k in range(n))
                q += n * ID_LEN
                spans = tuple(mv[q : q + n])
                full = bytes(mv[q + n : q + n + ID_LEN])
                yield kind, length, None, Delta(base, patches, full, spans)
                pos += need
            elif kind in (ZERO, UNUSED):
                yield kind, length, None, None
            else:
                raise IntegrityError(f"extent list has unknown kind {kind}")

    def total(self) -> int:
        return sum(n for _, n, _ in self)

    def num_chunks(self) -> int:
        return sum(1 for k, _, _ in self if k in (DATA, DELTA))

    def chunk_ids(self) -> Iterator[bytes]:
        """Every chunk id the content needs: data chunks, delta bases and patches."""
        for kind, _, cid, delta in self.records():
            if delta is not None:
                yield from delta.chunk_ids()
            elif kind == DATA and cid is not None:
                yield cid

    def __bytes__(self) -> bytes:
        return bytes(self.buf)




@dataclass
class Item(Meta):
    """An archived entry: the source's metadata (``Meta``: path, type, mode, owner, times,
    size, symlink/hard-link target, rdev, xattrs, source, fs, note) plus what the archive
    adds. ``source`` is where content came from: file, blockdev, chardev, fifo, stdin,
    command, table, partition, gap."""

    extents: Extents | None = None
    disk_offset: int | None = None  # where this item sits in a whole-disk archive
    partition: int | None = None  # partition number (whole-disk archives)
    stats: dict | None = None  # read/zero/unused/dedup bytes of this item at creation
    health: dict | None = None  # set by check --repair: damaged ranges
    fingerprints: list[bytes] | None = None  # chunks of 4 KiB block fingerprints (delta.py)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or (f.name == "extra" and not v):
                continue
            d[f.name] = bytes(v) if f.name == "extents" else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Item:
        try:
            kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
            if "extents" in kw:
                if not isinstance(kw["extents"], bytes):  # bytearray(<int>) would allocate it
                    raise TypeError("extents")
                kw["extents"] = Extents(kw["extents"])
            fps = kw.get("fingerprints")
            if fps is not None and not (isinstance(fps, list) and all(
                    isinstance(c, bytes) and len(c) == ID_LEN for c in fps)):
                raise TypeError("fingerprints")
            item = cls(**kw)
        except Exception:  # noqa: BLE001 - malformed metadata is one integrity error
            raise IntegrityError("archive item is malformed") from None
        if not isinstance(item.path, str) or not isinstance(item.size, int):
            raise IntegrityError("archive item is malformed")
        return item


def pack_items(items: list[Item]) -> bytes:
    # file names are bytes on Linux: undecodable ones travel as surrogate escapes
    return b"".join(msgpack.packb(i.to_dict(), unicode_errors="surrogateescape")
                    for i in items)


def item_from_value(d: object) -> Item:
    """One decoded msgpack value of an item stream as an Item (IntegrityError if not one)."""
    if not isinstance(d, dict):
        raise IntegrityError("archive item stream is malformed")
    return Item.from_dict(d)


def unpack_items(data: bytes) -> Iterator[Item]:
    u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 30,
                         unicode_errors="surrogateescape")
    u.feed(data)
    try:
        for d in u:
            yield item_from_value(d)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # TypeError: a map as key
        raise IntegrityError(f"archive item stream is malformed ({e})") from None
