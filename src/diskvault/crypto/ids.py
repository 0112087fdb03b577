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


# BLAKE3 derive_key contexts: globally unique, hard-coded, never reused for another purpose
_CHUNKER_SEED_CONTEXT = "diskvault 2026-11 FastCDC gear table seed"


def chunker_seed(id_key: bytes) -> int:
    """A secret FastCDC seed derived from the id key (format version 2).

    pyfastcdc XORs the seed into every gear-table entry; it takes at most 63 bits
    (the shifted table must fit 64 bits), and 0 means "the public table", so 0 is
    never returned.
    """
    d = blake3.blake3(id_key, derive_key_context=_CHUNKER_SEED_CONTEXT).digest(length=8)
    return (int.from_bytes(d, "little") & ((1 << 63) - 1)) or 1
