"""Chunk ids: keyed BLAKE3 of the plaintext, so ids reveal nothing in encrypted repos."""

from __future__ import annotations

import blake3

ID_LEN = 32


class IdHasher:
    def __init__(self, id_key: bytes) -> None:
        self._key = id_key

    def __call__(self, data: bytes | bytearray | memoryview) -> bytes:
        # blake3 releases the GIL for large inputs, so worker threads hash in parallel
        return blake3.blake3(data, key=self._key, max_threads=1).digest()
