"""The item stream of an archive: items packed with msgpack, cut into metadata chunks.

The stream is cut content-defined (FastCDC, ~256 KiB), so the item metadata of a
nightly archive of the same disk dedups against the previous night's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..chunking.fastcdc import FastCdcChunker
from ..errors import IntegrityError
from .model import Item, pack_items, unpack_items

_CUT = (64 << 10, 256 << 10, 1 << 20)


def write_item_stream(items: list[Item], store_chunk: Callable[[bytes], bytes],
                      seed: int = 0) -> list[bytes]:
    """``seed``: the repository's FastCDC seed (Repository.chunker_seed)."""
    data = pack_items(items)
    if not data:
        return []
    cdc = FastCdcChunker(*_CUT, seed)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        b = data[pos : pos + n]
        pos += len(b)
        return b

    return [store_chunk(c) for c in cdc.chunks(read)]


def read_item_stream(chunk_ids: list[bytes], get_chunk: Callable[[bytes], bytes]
                     ) -> Iterator[Item]:
    if not isinstance(chunk_ids, list):
        raise IntegrityError("archive item list is malformed")
    data = b"".join(get_chunk(bytes(c)) for c in chunk_ids)
    yield from unpack_items(data)
