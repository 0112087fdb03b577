"""Keyed BLAKE3 of every 4 KiB block of a buffer: the block fingerprints of format v2.

A million blocks per 4 GiB makes this the largest hashing cost of a backup. The native
kernel (``_blockhash.c``, built at install where a C compiler is, x86-64 with AVX2 or
AVX-512) hashes 8 or 16 blocks per SIMD pass and releases the GIL once per call: 0.8 ms
per 4 MiB here against 1.8 ms for blake3-py, which hashes one block per call (4 SIMD
lanes: a block is 4 BLAKE3 chunks) and, in two worker threads, contends for the GIL a
thousand times per window. Same digests either way (tests/crypto/test_blockhash.py).
"""

from __future__ import annotations

from types import ModuleType

import blake3

_native: ModuleType | None
try:
    from . import _blockhash as _native
except ImportError:  # installed without a C compiler
    _native = None

BLOCK = 4096


def native_lanes() -> int:
    """How many blocks the native kernel hashes at once; 0 when it is not built or this
    CPU has no kernel."""
    return _native.LANES if _native is not None else 0


_LANES = native_lanes()


def keyed_blocks(key: bytes, data: bytes | bytearray | memoryview, outlen: int) -> bytes:
    """The first ``outlen`` bytes of the keyed BLAKE3 of each whole 4 KiB block of
    ``data``, concatenated (a short tail is the caller's)."""
    # fewer blocks than lanes (the changed blocks of --changed-extents come one by one):
    # blake3-py hashes a single block faster than the kernel hashes a padded group
    if _LANES and len(data) >= _LANES * BLOCK:
        assert _native is not None
        return _native.keyed_blocks(key, data, outlen)
    return keyed_blocks_portable(key, data, outlen)


def block_digests(key: bytes, data: bytes | bytearray | memoryview, outlen: int) -> bytes:
    """``keyed_blocks`` and then the short last block's digest, if there is one: the
    block fingerprints of an item, and the block digests of a version 3 chunk id."""
    whole = keyed_blocks(key, data, outlen)
    tail = len(data) % BLOCK
    if not tail:
        return whole
    last = memoryview(data)[len(data) - tail :]
    return whole + blake3.blake3(last, key=key, max_threads=1).digest(outlen)


def keyed_blocks_portable(key: bytes, data: bytes | bytearray | memoryview,
                          outlen: int) -> bytes:
    # one keyed hasher, reset per block: a new keyed hasher per block costs a key
    # parse and two objects, ~20 % of the CPU this loop takes; a hasher per call keeps
    # the worker threads apart
    mv, h = memoryview(data), blake3.blake3(key=key, max_threads=1)
    reset, update, digest = h.reset, h.update, h.digest
    out = []
    for i in range(0, len(mv) - len(mv) % BLOCK, BLOCK):
        reset()
        update(mv[i : i + BLOCK])
        out.append(digest(outlen))
    return b"".join(out)
