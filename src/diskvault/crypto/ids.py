"""Chunk ids: keyed hashes of the plaintext, so ids reveal nothing in encrypted repos.

Two definitions, chosen by the repository's format version (docs/format.md, Chunks):

- versions 1 and 2 (``IdHasher``): keyed BLAKE3 of the plaintext;
- version 3 (``BlockIdHasher``): keyed BLAKE3 of the plaintext's length and the list of
  its 4 KiB blocks' keyed BLAKE3 digests. A backup needs those block digests anyway:
  their first bytes are the block fingerprints of format version 2 (archive/delta.py).
  So one pass over a window gives both its fingerprints and its id, where version 2
  hashed every byte twice (the id pass was ~7 % of the CPU of a root-image backup).
"""

from __future__ import annotations

import struct

import blake3

from .blockhash import block_digests

ID_LEN = 32
DIGEST_LEN = 32  # a block digest in full: a version 3 id hashes these
# BLAKE3 derive_key contexts: globally unique, hard-coded, never reused for another purpose
_CHUNKER_SEED_CONTEXT = "diskvault 2026-11 FastCDC gear table seed"
_BLOCK_DIGEST_CONTEXT = "diskvault 2 block fingerprint"  # named for version 2, which began it
_BLOCK_LIST_ID_CONTEXT = "diskvault 3 chunk id over block digests"
_LENGTH = struct.Struct("<Q")


class IdHasher:
    """Versions 1 and 2: keyed BLAKE3 of the plaintext."""

    def __init__(self, id_key: bytes) -> None:
        self._key = id_key

    def __call__(self, data: bytes | bytearray | memoryview) -> bytes:
        # blake3 releases the GIL for large inputs, so worker threads hash in parallel
        return blake3.blake3(data, key=self._key, max_threads=1).digest()


def block_digest_key(id_key: bytes) -> bytes:
    """The key of the 4 KiB block digests (and so of the block fingerprints)."""
    return blake3.blake3(id_key, derive_key_context=_BLOCK_DIGEST_CONTEXT).digest()


class BlockIdHasher(IdHasher):
    """Version 3: ``BLAKE3(key=K_id3, u64 length ‖ D_0 ‖ … ‖ D_n-1)`` where ``D_i`` is the
    32-byte BLAKE3 of block ``i`` keyed with ``block_digest_key`` (the last block may be
    short; empty data has no blocks).

    As collision-resistant as BLAKE3 itself: two plaintexts with one id have the same
    length and either equal digest lists (then a digest collision) or an outer
    collision. Callers that also need the fingerprints call ``digests`` once and pass
    them to ``from_digests``."""

    def __init__(self, id_key: bytes) -> None:
        super().__init__(blake3.blake3(id_key, derive_key_context=_BLOCK_LIST_ID_CONTEXT
                                       ).digest())
        self.digest_key = block_digest_key(id_key)

    def digests(self, data: bytes | bytearray | memoryview) -> bytes:
        """``DIGEST_LEN`` bytes per 4 KiB block of ``data``, a short last block included."""
        return block_digests(self.digest_key, data, DIGEST_LEN)

    def from_digests(self, digests: bytes, length: int) -> bytes:
        h = blake3.blake3(_LENGTH.pack(length), key=self._key, max_threads=1)
        h.update(digests)
        return h.digest()

    def __call__(self, data: bytes | bytearray | memoryview) -> bytes:
        return self.from_digests(self.digests(data), len(data))


def id_hasher(id_key: bytes, format_version: int) -> IdHasher:
    return BlockIdHasher(id_key) if format_version >= 3 else IdHasher(id_key)


def chunker_seed(id_key: bytes) -> int:
    """A secret FastCDC seed derived from the id key (format version 2).

    pyfastcdc XORs the seed into every gear-table entry; it takes at most 63 bits
    (the shifted table must fit 64 bits), and 0 means "the public table", so 0 is
    never returned.
    """
    d = blake3.blake3(id_key, derive_key_context=_CHUNKER_SEED_CONTEXT).digest(length=8)
    return (int.from_bytes(d, "little") & ((1 << 63) - 1)) or 1
