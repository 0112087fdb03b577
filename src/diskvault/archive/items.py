"""The item stream of an archive: items packed with msgpack, cut into metadata chunks.

The stream is cut content-defined (FastCDC, ~256 KiB), so the item metadata of a
nightly archive of the same disk dedups against the previous night's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgpack

from ..chunking.fastcdc import FastCdcChunker
from ..errors import IntegrityError
from .model import Item, item_from_value, pack_items

_CUT = (64 << 10, 256 << 10, 1 << 20)
# One item's packed metadata may not exceed this: an extent list of 6.5 M data chunks,
# a 26 TiB device in 4 MiB chunks. The reader holds at most this much undecoded data
# plus one metadata chunk, however long or repetitive the chunk list is.
MAX_ITEM_META = 256 << 20
_FEED = 1 << 20  # bytes fed to the decoder at a time
# Writers cut the stream into chunks of at most _CUT[2]; a reader that must hold whole
# runs of chunks (check's robust reader) refuses larger ones, so an item list naming a
# huge chunk many times costs at most 4× what that many real metadata chunks would.
MAX_META_CHUNK = 4 * _CUT[2]


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
    """Decode the items chunk by chunk, never joining the chunks.

    The chunk list comes from the repository: it may name one huge chunk many times. So
    items are decoded as they complete and the undecoded rest is bounded by
    ``MAX_ITEM_META`` (msgpack refuses to buffer more): memory stays at one chunk plus
    one item, not the sum of all chunks.
    """
    if not isinstance(chunk_ids, list) or not all(isinstance(c, bytes) for c in chunk_ids):
        raise IntegrityError("archive item list is malformed")
    u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=MAX_ITEM_META,
                         unicode_errors="surrogateescape")
    fed = 0
    try:
        for cid in chunk_ids:
            data = memoryview(get_chunk(cid))
            for pos in range(0, len(data), _FEED):
                u.feed(data[pos : pos + _FEED])
                for value in u:
                    yield item_from_value(value)
            fed += len(data)
            del data
        if u.tell() != fed:
            raise IntegrityError("archive item stream is truncated")
    except msgpack.BufferFull:
        raise IntegrityError(f"archive item stream: an item's metadata exceeds "
                             f"{MAX_ITEM_META >> 20} MiB") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # TypeError: a map as key
        raise IntegrityError(f"archive item stream is malformed ({e})") from None
