"""Delta extents: a window stored as the parent's chunk plus patches of changed blocks.

A ``delta`` extent (format version 2) records a base data chunk, up to ``MAX_DEPTH``
patch chunks applied in order, and a full-content id. A **patch** holds only the 4 KiB
blocks that differ from the version before it (a bitmap + those blocks). The
**full-content id** is a keyed hash over the window's block fingerprints, so it is
known without reading unchanged blocks (``--changed-extents``) and ``check
--verify-data`` recomputes it from the reconstructed window.

**Block fingerprints**: 8 bytes of keyed BLAKE3 per 4 KiB block of an item (0.2 % of
its size), with a key derived from the id key (the first bytes of the block digests a
version 3 chunk id is made of, crypto/ids.py); stored per item as a stream of ordinary
chunks (``Item.fingerprints``), ``FP_CHUNK_BLOCKS`` blocks per chunk, so the next backup
on any host compares blocks without the parent's data.

``materialize`` is the one way to turn a delta extent into bytes: restore and the
random-access reader both call it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

import blake3
import numpy as np

from ..crypto.blockhash import BLOCK, block_digests
from ..crypto.ids import DIGEST_LEN, block_digest_key
from ..errors import IntegrityError

FP_LEN = 8
FP_CHUNK_BLOCKS = 1 << 16  # 64 Ki blocks = 256 MiB of item per fingerprint chunk (512 KiB)
# A patch beyond a quarter of its window is stored whole: the restore would read the
# base plus patches larger than the window for little saving. 12 patches: a restore reads
# ≤ 13 objects per window (fetched in parallel; patches are small). A full chain folds its
# newest run of equal patches into one (merge_span) instead of writing the window whole:
# each fold rewrites the blocks of the patches it folds, so the depth trades write
# amplification (a fold every 12 backups: ~1.8× the changed bytes over 30 daily backups,
# 8: ~1.9×) against objects per restored window (docs/format.md).
MAX_CHANGED_FRACTION = 0.25
MAX_DEPTH = 12
_PATCH_HEAD = struct.Struct("<4sI")
_PATCH_MAGIC = b"DVP1"


class Delta(NamedTuple):
    base: bytes  # a data chunk: the window as some earlier archive stored it whole
    patches: tuple[bytes, ...]  # patch chunks, oldest first
    full: bytes  # keyed hash of the window's block fingerprints
    spans: tuple[int, ...] = ()  # per patch: how many backups' changes it holds (≤ 255)

    def chunk_ids(self) -> list[bytes]:
        return [self.base, *self.patches]


class Fingerprinter:
    """Per-block fingerprints and full-content ids, keyed from the repository's id key."""

    def __init__(self, id_key: bytes) -> None:
        self._fp_key = block_digest_key(id_key)
        self._full_key = blake3.blake3(id_key, derive_key_context="diskvault 2 delta content"
                                       ).digest()
        self.zero_fp = self._one(bytes(BLOCK))

    def _one(self, block: bytes | memoryview) -> bytes:
        return blake3.blake3(block, key=self._fp_key, max_threads=1).digest(FP_LEN)

    def blocks(self, data: bytes | bytearray | memoryview) -> bytes:
        """The fingerprints of every 4 KiB block of ``data`` (a short last block as is)."""
        return block_digests(self._fp_key, data, FP_LEN)

    def from_digests(self, digests: bytes) -> bytes:
        """The fingerprints in a version 3 id's block digests (``BlockIdHasher.digests``):
        a fingerprint is the first ``FP_LEN`` bytes of a digest (BLAKE3 output is a
        stream: a shorter digest is the longer one's start)."""
        return np.frombuffer(digests, np.uint8).reshape(-1, DIGEST_LEN)[:, :FP_LEN].tobytes()

    def zeros(self, length: int) -> bytes:
        """Fingerprints of ``length`` zero bytes (zero and unused runs)."""
        n, tail = divmod(length, BLOCK)
        return self.zero_fp * n + (self._one(bytes(tail)) if tail else b"")

    def full_id(self, fps: bytes, length: int) -> bytes:
        return blake3.blake3(struct.pack("<Q", length) + fps, key=self._full_key,
                             max_threads=1).digest()


def changed_blocks(new_fps: bytes, old_fps: bytes) -> np.ndarray:
    """Indexes of the blocks whose fingerprints differ (equal-length fingerprint strings)."""
    a = np.frombuffer(new_fps, "<u8")
    b = np.frombuffer(old_fps, "<u8")
    return np.flatnonzero(a != b)


# --- patch chunks ----------------------------------------------------------------------


def encode_patch(length: int, blocks: np.ndarray,
                 read_block: Callable[[int], bytes | memoryview]) -> bytes:
    """``"DVP1" | window length u32 | bitmap (1 bit per block) | the changed blocks``."""
    nblocks = -(-length // BLOCK)
    bitmap = np.zeros(nblocks, np.uint8)
    bitmap[blocks] = 1
    parts: list[bytes | memoryview] = [_PATCH_HEAD.pack(_PATCH_MAGIC, length),
                                       np.packbits(bitmap, bitorder="little").tobytes()]
    parts += [read_block(int(i)) for i in blocks]
    return b"".join(parts)


def patch_blocks(patch: bytes) -> dict[int, bytes]:
    """The blocks a patch holds, by block number."""
    if len(patch) < _PATCH_HEAD.size:
        raise IntegrityError("delta patch is truncated")
    magic, length = _PATCH_HEAD.unpack_from(patch)
    if magic != _PATCH_MAGIC:
        raise IntegrityError("delta patch is malformed")
    nblocks = -(-length // BLOCK)
    pos = _PATCH_HEAD.size + (nblocks + 7) // 8
    bits = np.unpackbits(np.frombuffer(patch, np.uint8, (nblocks + 7) // 8, _PATCH_HEAD.size),
                         bitorder="little")[:nblocks]
    out = {}
    for i in np.flatnonzero(bits):
        n = min(BLOCK, length - int(i) * BLOCK)
        out[int(i)] = patch[pos : pos + n]
        pos += n
    return out


def merge_span(spans: tuple[int, ...]) -> int:
    """How many trailing patches to merge with a new one when a chain is full: the run
    of patches with the newest patch's span (size-tiered, like a binary counter), so
    each changed block is rewritten about once in ``MAX_DEPTH`` backups."""
    m = 1
    while m < len(spans) and spans[-m - 1] == spans[-1]:
        m += 1
    return m


def apply_patch(window: bytearray, patch: bytes) -> None:
    if len(patch) < _PATCH_HEAD.size:
        raise IntegrityError("delta patch is truncated")
    magic, length = _PATCH_HEAD.unpack_from(patch)
    if magic != _PATCH_MAGIC or length != len(window):
        raise IntegrityError("delta patch does not fit its window")
    nblocks = -(-length // BLOCK)
    pos = _PATCH_HEAD.size + (nblocks + 7) // 8
    bits = np.unpackbits(np.frombuffer(patch, np.uint8, (nblocks + 7) // 8, _PATCH_HEAD.size),
                         bitorder="little")[:nblocks]
    mv = memoryview(patch)
    for i in np.flatnonzero(bits):
        a = int(i) * BLOCK
        n = min(BLOCK, length - a)
        if pos + n > len(patch):
            raise IntegrityError("delta patch is truncated")
        window[a : a + n] = mv[pos : pos + n]
        pos += n
    if pos != len(patch):
        raise IntegrityError("delta patch has trailing bytes")


def combine(length: int, base: bytes, patches: list[bytes]) -> bytes:
    """The window from its base chunk and patches (already fetched)."""
    if len(base) != length:
        raise IntegrityError("delta base chunk size mismatch")
    out = bytearray(base)
    for p in patches:
        apply_patch(out, p)
    return bytes(out)


def materialize(length: int, delta: Delta, fetch: Callable[[bytes], bytes]) -> bytes:
    """The ``length`` bytes of a delta extent, fetching its chunks with ``fetch``."""
    return combine(length, fetch(delta.base), [fetch(p) for p in delta.patches])
