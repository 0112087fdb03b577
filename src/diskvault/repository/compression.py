"""Compression of object plaintexts: none, lz4, zstd[,level], auto,C[,L].

Compressed layout: ``algo(1) | plain_size(u64 LE) | data``. The plain size lets
decompression allocate exactly once and refuse hostile sizes before doing work.
``auto`` first compresses evenly spread samples with lz4 and stores an object whose
samples all fail uncompressed without compressing it; otherwise it tries lz4 on the
whole object and stores incompressible data uncompressed, so random regions cost
almost nothing.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import lz4.block
import zstandard

from ..errors import IntegrityError, UsageError

_native: ModuleType | None
try:
    from . import _lz4 as _native
except ImportError:  # installed without liblz4's headers or a C compiler
    _native = None


def _python_lz4(data: bytes | bytearray | memoryview) -> bytes:
    return lz4.block.compress(data, store_size=False)


# one LZ4 block, no size prefix: the native part writes it without python-lz4's copy of
# the output (_lz4.c); the same format either way
lz4_compress: Callable[[bytes | bytearray | memoryview], bytes] = (
    _native.compress if _native is not None else _python_lz4)

NONE, LZ4, ZSTD = 0, 1, 2
NAMES = {"none": NONE, "lz4": LZ4, "zstd": ZSTD}
HEADER = struct.Struct("<BQ")
MAX_PLAIN = 256 << 20  # larger than any object we write; refuse more on read
LZ4_MAX_RATIO = 255  # an LZ4 block cannot expand more: each length byte adds ≤ 255
AUTO_KEEP_RATIO = 0.97  # lz4 must save at least 3 % or the data is stored as is
# auto: lz4 on SAMPLES pieces of SAMPLE_LEN bytes decides whether a large object is
# worth compressing at all (1.6 % of a 4 MiB chunk; every 256 KiB one sample)
SAMPLES = 16
SAMPLE_LEN = 4096
SAMPLE_MIN = 4 * SAMPLES * SAMPLE_LEN  # smaller objects: just compress them

_tls = threading.local()  # zstd (de)compressor objects are not thread-safe


def _zc(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_tls, "zc", None)
    if cache is None:
        cache = _tls.zc = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=False)
    return c


def _zd() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class Compression:
    algo: int = LZ4
    level: int = 0
    auto: bool = False

    @classmethod
    def parse(cls, spec: str) -> Compression:
        parts = spec.split(",")
        auto = parts[0] == "auto"
        if auto:
            parts = parts[1:]
            if not parts:
                raise UsageError("compression 'auto' needs an algorithm: auto,zstd[,L]")
        name = parts[0]
        if name not in NAMES or len(parts) > 2:
            raise UsageError(f"invalid compression {spec!r}: use none, lz4, zstd[,L], auto,C[,L]")
        level = 0
        if len(parts) == 2:
            if name != "zstd" or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 22:
                raise UsageError(f"invalid compression level in {spec!r} (zstd: 1..22)")
            level = int(parts[1])
        elif name == "zstd":
            level = 3
        return cls(NAMES[name], level, auto)

    def __str__(self) -> str:
        name = {v: k for k, v in NAMES.items()}[self.algo]
        s = f"{name},{self.level}" if self.algo == ZSTD else name
        return f"auto,{s}" if self.auto else s

    def compress(self, data: bytes | memoryview) -> bytes:
        header, body = self.encode(data)
        return header + body

    def encode(self, data: bytes | bytearray | memoryview
               ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """``(header, body)`` of the compressed layout; body may be ``data`` itself
        (stored as is), so the caller can write it without a copy."""
        n = len(data)
        if self.algo == NONE or (self.auto and _incompressible(data)):
            return HEADER.pack(NONE, n), data
        if self.auto or self.algo == LZ4:
            fast = lz4_compress(data)
            if len(fast) > n * AUTO_KEEP_RATIO and (self.auto or len(fast) >= n):
                return HEADER.pack(NONE, n), data
            if self.algo == LZ4:
                return HEADER.pack(LZ4, n), fast
        out = _zc(self.level).compress(data)
        if len(out) >= n:
            return HEADER.pack(NONE, n), data
        return HEADER.pack(ZSTD, n), out


def _incompressible(data: bytes | bytearray | memoryview) -> bool:
    """True if evenly spread samples of ``data`` all fail to compress with lz4.

    lz4 spends as long failing on random data as it takes on text (≈ 6 ms per 4 MiB
    here), and encrypted/compressed regions are a large part of disk images. One
    compressible sample is enough to try the whole object, so a chunk mixing random
    data with zeros or text still gets compressed; only compressible runs shorter than
    the distance between two samples (1/16 of the object) can go unnoticed.
    """
    n = len(data)
    if n < SAMPLE_MIN:
        return False
    mv = memoryview(data)
    step = n // SAMPLES
    for i in range(SAMPLES):
        off = i * step + (step - SAMPLE_LEN) // 2
        sample = mv[off : off + SAMPLE_LEN]
        if len(lz4_compress(sample)) <= SAMPLE_LEN * AUTO_KEEP_RATIO:
            return False
    return True


def _zstd_decompress(body: memoryview, n: int, what: str) -> bytes:
    """Decompress one zstd frame of exactly ``n`` plain bytes, allocating at most ``n``.

    python-zstandard allocates what the frame header claims and ignores
    ``max_output_size`` then (a 32 KB frame claiming 1 GiB made it allocate 1 GiB), and
    ``max_output_size=0`` means "no limit": so the claim is checked first. We write
    frames without a content size; one that states a size must state ours.
    """
    if n == 0:
        raise IntegrityError(f"{what}: empty zstd object")  # never written: stored as none
    claimed = zstandard.frame_content_size(body)
    if claimed not in (-1, n):
        raise IntegrityError(f"{what}: zstd frame claims {claimed} bytes, the header {n}")
    return _zd().decompress(body, max_output_size=n)


def decompress(blob: bytes | memoryview, what: str) -> bytes:
    mv = memoryview(blob)
    if len(mv) < HEADER.size:
        raise IntegrityError(f"{what}: truncated compression header")
    algo, n = HEADER.unpack_from(mv)
    if n > MAX_PLAIN:
        raise IntegrityError(f"{what}: implausible size {n}")
    body = mv[HEADER.size :]
    try:
        if algo == NONE:
            out = bytes(body)
        elif algo == LZ4:
            if n > LZ4_MAX_RATIO * len(body) + 64:
                raise IntegrityError(f"{what}: lz4 data of {len(body)} bytes cannot hold {n}")
            out = lz4.block.decompress(body, uncompressed_size=n)
        elif algo == ZSTD:
            out = _zstd_decompress(body, n, what)
        else:
            raise IntegrityError(f"{what}: unknown compression {algo}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise IntegrityError(f"{what}: cannot decompress ({e})") from None
    if len(out) != n:
        raise IntegrityError(f"{what}: decompressed size mismatch")
    return out


# by the numbers (bench/README.md): as small as lz4 on real file systems, and on
# disk images with encrypted or compressed regions it skips almost all lz4 work
DEFAULT_COMPRESSION = Compression(LZ4, 0, auto=True)
