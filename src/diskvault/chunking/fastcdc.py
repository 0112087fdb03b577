"""Content-defined chunking with FastCDC (pyfastcdc, a C implementation)."""

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

    def __init__(self, min_size: int, avg_size: int, max_size: int) -> None:
        self.cdc = FastCDC(avg_size=avg_size, min_size=min_size, max_size=max_size)

    def chunks(self, read: StreamRead) -> Iterator[bytes]:
        for c in self.cdc.cut_stream(_Reader(read)):
            # the memoryview is only valid until the next chunk: copy it out
            yield bytes(c.data)
