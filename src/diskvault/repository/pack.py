"""Pack files: many sealed objects in one storage value, with their own table of contents.

Layout::

    b"DVPACK01" | object blobs ... | TOC blob | trailer
    trailer = toc_offset (u64 LE) | toc_length (u32 LE) | b"DVPE"

The TOC is a sealed object (aad ``b"pack-toc"``) holding msgpack
``[[id, offset, length, plain_size], ...]``, so the chunk index can always be rebuilt
from packs alone. A pack is named by the BLAKE3 hash of its bytes: immutable, and a
full read can verify it without any key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3
import msgpack

from ..crypto.aead import Buffer
from ..errors import IntegrityError
from .compression import LZ4, Compression
from .objects import ObjectCodec, Sealed

MAGIC = b"DVPACK01"
TRAILER = struct.Struct("<QI4s")
TRAILER_MAGIC = b"DVPE"
TOC_AAD = b"pack-toc"
MAX_TOC = 64 << 20
# One compression for every TOC, whatever a backup chose for its chunks: repair rebuilds
# a pack whose damage lay in its TOC or trailer from the salvaged chunks, and only a TOC
# sealed the same way gives the same bytes, hence the same name (repository/repair.py).
# With the backup's choice, `auto,lz4` stored a TOC of random ids as is where repair's
# `lz4` compressed it by 1 %, and the rebuilt pack got a new name in some layouts.
TOC_COMPRESSION = Compression(LZ4)


@dataclass
class PackEntry:
    id: bytes
    offset: int
    length: int
    plain_size: int


def pack_key(name: str) -> str:
    return f"packs/{name[:2]}/{name}"


def _new_hasher() -> blake3.blake3:
    return blake3.blake3(MAGIC, max_threads=1)


@dataclass
class PackWriter:
    """Collects sealed objects as the buffers they are made of and hashes them as they
    come (one BLAKE3 pass, while the bytes are fresh in cache), so a finished pack is
    named without another pass and written with ``writev`` without joining it."""

    target_size: int
    parts: list[Buffer] = field(default_factory=lambda: [MAGIC])
    size: int = len(MAGIC)
    entries: list[PackEntry] = field(default_factory=list)
    hasher: blake3.blake3 = field(default_factory=_new_hasher)

    def add(self, obj_id: bytes, blob: Buffer | Sealed, plain_size: int) -> None:
        parts = blob.parts if isinstance(blob, Sealed) else [blob]
        length = len(blob)
        self.entries.append(PackEntry(obj_id, self.size, length, plain_size))
        for p in parts:
            self.hasher.update(p)  # releases the GIL: overlaps with the chunk workers
            self.parts.append(p)
        self.size += length

    @property
    def full(self) -> bool:
        return self.size >= self.target_size

    def __len__(self) -> int:
        return len(self.entries)

    def finish(self, codec: ObjectCodec) -> tuple[str, bytes, list[PackEntry]]:
        """Name, bytes (joined) and entries, for callers that want one buffer."""
        name, parts, _size, entries = self.finish_parts(codec)
        return name, b"".join(parts), entries

    def finish_parts(self, codec: ObjectCodec) -> tuple[str, list[Buffer], int, list[PackEntry]]:
        """Name, the pack's bytes as buffers in order, its size, and its entries."""
        toc = msgpack.packb([[e.id, e.offset, e.length, e.plain_size] for e in self.entries])
        toc_blob = codec.seal(TOC_AAD, toc, TOC_COMPRESSION)
        trailer = TRAILER.pack(self.size, len(toc_blob), TRAILER_MAGIC)
        self.hasher.update(toc_blob)
        self.hasher.update(trailer)
        parts = [*self.parts, toc_blob, trailer]
        size = self.size + len(toc_blob) + len(trailer)
        name = self.hasher.hexdigest()
        entries = self.entries
        self.parts, self.size, self.entries, self.hasher = [MAGIC], len(MAGIC), [], _new_hasher()
        return name, parts, size, entries


def pack_name(data: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(data, max_threads=1).hexdigest()


def parse_trailer(tail: bytes, pack_size: int, what: str) -> tuple[int, int]:
    if len(tail) < TRAILER.size:
        raise IntegrityError(f"{what}: too short for a pack")
    toc_offset, toc_len, magic = TRAILER.unpack(tail[-TRAILER.size :])
    if magic != TRAILER_MAGIC or toc_len > MAX_TOC or \
            toc_offset < len(MAGIC) or toc_offset + toc_len + TRAILER.size != pack_size:
        raise IntegrityError(f"{what}: damaged pack trailer")
    return toc_offset, toc_len


def parse_toc(codec: ObjectCodec, toc_blob: bytes, toc_offset: int, what: str) -> list[PackEntry]:
    toc = codec.open(TOC_AAD, toc_blob, f"{what} table of contents")
    try:
        rows = msgpack.unpackb(toc, max_bin_len=64, max_array_len=1 << 22)
        entries = [PackEntry(bytes(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]
    except Exception:  # noqa: BLE001 - any malformed TOC is one integrity error
        raise IntegrityError(f"{what}: malformed table of contents") from None
    for e in entries:
        if len(e.id) != 32 or e.offset < len(MAGIC) or e.length <= 0 \
                or e.offset + e.length > toc_offset:
            raise IntegrityError(f"{what}: table of contents points outside the pack")
    return entries


def read_toc(load, name: str, size: int, codec: ObjectCodec) -> list[PackEntry]:
    """Read only a pack's trailer and TOC (two range reads) and return its entries."""
    what = f"pack {name[:16]}"
    toc_offset, toc_len = parse_trailer(load(pack_key(name), size - TRAILER.size, TRAILER.size),
                                        size, what)
    return parse_toc(codec, load(pack_key(name), toc_offset, toc_len), toc_offset, what)


def parse_pack(data: bytes, codec: ObjectCodec, name: str | None = None) -> list[PackEntry]:
    """Verify a whole pack in memory (name = content hash, magic, TOC) and return entries."""
    what = f"pack {(name or '?')[:16]}"
    if name is not None and blake3.blake3(data).hexdigest() != name:
        raise IntegrityError(f"{what}: content does not match its name (damaged)")
    if not data.startswith(MAGIC):
        raise IntegrityError(f"{what}: bad magic")
    toc_offset, toc_len = parse_trailer(data, len(data), what)
    return parse_toc(codec, data[toc_offset : toc_offset + toc_len], toc_offset, what)
