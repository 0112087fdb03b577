"""Fixed-size chunking at item offsets HEADER + k × SIZE."""

from __future__ import annotations

from collections.abc import Iterator

from .base import Chunker, StreamRead, read_full


class FixedChunker(Chunker):
    fixed = True

    def __init__(self, size: int, header: int = 0) -> None:
        self.size = size
        self.header = header

    def windows(self, size: int) -> Iterator[tuple[int, int]]:
        pos = 0
        if self.header:
            end = min(self.header, size)
            if end > 0:
                yield 0, end
            pos = end
        while pos < size:
            end = min(pos + self.size, size)
            yield pos, end
            pos = end

    def chunks(self, read: StreamRead) -> Iterator[bytes]:
        first = True
        while True:
            n = self.header if first and self.header else self.size
            first = False
            b = read_full(read, n)
            if not b:
                return
            yield b
            if len(b) < n:
                return
