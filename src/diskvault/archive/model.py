"""Archive items and their extent lists.

An item is a file, a directory entry, a device read as a file, a stdin stream, or a
region of a disk. Content items carry **extents**: runs of
``data`` (one chunk id), ``zero`` (all-zero: never hashed or stored) and ``unused``
(free space of the filesystem on it: never read). A later ``delta`` kind (a chunk that
differs from the parent archive's chunk at the same offset in a few blocks) gets kind 3.

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

KIND_NAMES = {DATA: "data", ZERO: "zero", UNUSED: "unused"}
_EXT = struct.Struct("<BQ")
ID_LEN = 32


class Extents:
    """Append-only packed extent list; consecutive zero/unused runs are merged."""

    __slots__ = ("buf", "_last_kind", "_last_pos")

    def __init__(self, data: bytes = b"") -> None:
        self.buf = bytearray(data)
        self._last_kind = -1
        self._last_pos = -1

    def append(self, kind: int, length: int, chunk_id: bytes | None = None) -> None:
        if length <= 0:
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
        """Yield ``(kind, length, chunk_id or None)``; raises IntegrityError if malformed."""
        mv, pos, end = memoryview(self.buf), 0, len(self.buf)
        while pos < end:
            if pos + _EXT.size > end:
                raise IntegrityError("extent list is truncated")
            kind, length = _EXT.unpack_from(mv, pos)
            pos += _EXT.size
            if kind == DATA:
                if pos + ID_LEN > end:
                    raise IntegrityError("extent list is truncated")
                yield kind, length, bytes(mv[pos : pos + ID_LEN])
                pos += ID_LEN
            elif kind in (ZERO, UNUSED):
                yield kind, length, None
            else:
                raise IntegrityError(f"extent list has unknown kind {kind}")

    def total(self) -> int:
        return sum(n for _, n, _ in self)

    def num_chunks(self) -> int:
        return sum(1 for k, _, _ in self if k == DATA)

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
