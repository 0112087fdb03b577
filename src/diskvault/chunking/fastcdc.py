"""Content-defined chunking with FastCDC (pyfastcdc, a C implementation).

Keyed (format version 2): with the public gear table, the cut points of known content
are public too, so the chunk sizes an observer of the storage sees fingerprint it.
A secret seed (crypto/ids.py chunker_seed) XORed into every gear-table entry makes the
cut points depend on the repository's key. pyfastcdc does this in C while building
the table: the chunking speed is unchanged (measured: pyfastcdc alone ~3 GB/s, this
chunker with its copies ~0.85-1 GB/s per core, seeded or not).
"""

from __future__ import annotations

from collections.abc import Iterator

from pyfastcdc import FastCDC

from .base import Chunker, StreamRead


class _Reader:
    """Adapts a read(n) callable to the file-like object pyfastcdc wants."""

    def __init__(self, read: StreamRead) -> None:
        self.read = read


class FastCdcChunker(Chunker):
    fixed = False

    def __init__(self, min_size: int, avg_size: int, max_size: int, seed: int = 0) -> None:
        # seed 0: the public table (version 1 repositories, whose boundaries must not move)
        self.cdc = FastCDC(avg_size=avg_size, min_size=min_size, max_size=max_size,
                           seed=seed)

    def chunks(self, read: StreamRead) -> Iterator[bytes]:
        for c in self.cdc.cut_stream(_Reader(read)):
            # the memoryview is only valid until the next chunk: copy it out
            yield bytes(c.data)
