"""Decompression bombs: an object may never make the client allocate more than its
header's plain size (itself capped at MAX_PLAIN), whatever its compressed frame claims.

Peak memory is measured as the max RSS of a subprocess that does only the decompress.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lz4.block
import pytest
import zstandard

from diskvault.errors import IntegrityError
from diskvault.repository.compression import HEADER, LZ4, ZSTD, Compression, decompress

GIB = 1 << 30


def _zstd_frame_claiming(size: int) -> bytes:
    """A zstd frame of ``size`` zero bytes that states its content size (~32 KB)."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    parts = [cobj.compress(bytes(1 << 20)) for _ in range(size >> 20)]
    return b"".join(parts) + cobj.flush()


def _peak_rss_of_decompress(blob: bytes) -> tuple[str, int]:
    """Run decompress(blob) in a fresh process; return (outcome, peak RSS in bytes)."""
    code = textwrap.dedent("""
        import resource, sys
        from diskvault.errors import IntegrityError
        from diskvault.repository.compression import decompress
        blob = sys.stdin.buffer.read()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            out = decompress(blob, "object x")
            outcome = f"ok {len(out)}"
        except IntegrityError as e:
            outcome = f"IntegrityError: {e}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(outcome)
        print((peak - base) * 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                       check=True, timeout=120)
    outcome, grew = r.stdout.decode().strip().splitlines()
    return outcome, int(grew)


def test_zstd_frame_claiming_1gib_is_refused_in_low_memory():
    frame = _zstd_frame_claiming(GIB)
    assert len(frame) < 64 << 10
    blob = HEADER.pack(ZSTD, 4 << 20) + frame  # the header stays within MAX_PLAIN
    outcome, grew = _peak_rss_of_decompress(blob)
    assert outcome.startswith("IntegrityError: object x:"), outcome
    assert "\n" not in outcome
    assert grew < 64 << 20, f"decompress grew RSS by {grew >> 20} MiB"


def test_zstd_frame_with_matching_claim_still_decodes():
    data = b"diskvault " * 50000
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    assert decompress(HEADER.pack(ZSTD, len(data)) + frame, "x") == data
    # and what we write ourselves (no content size in the frame)
    assert decompress(Compression.parse("zstd,3").compress(data), "x") == data


@pytest.mark.parametrize("claimed", [1, 1000, (4 << 20) + 1])
def test_zstd_claim_disagreeing_with_header_is_refused(claimed):
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(claimed))
    with pytest.raises(IntegrityError, match="claims"):
        decompress(HEADER.pack(ZSTD, 4 << 20) + frame, "x")


def test_zstd_empty_object_is_refused():
    with pytest.raises(IntegrityError):
        decompress(HEADER.pack(ZSTD, 0) + b"\x28\xb5\x2f\xfd\x00\x00\x01\x00\x00", "x")


def test_lz4_size_beyond_what_the_block_can_hold_is_refused_before_allocating():
    block = lz4.block.compress(bytes(1 << 20), store_size=False)
    assert decompress(HEADER.pack(LZ4, 1 << 20) + block, "x") == bytes(1 << 20)
    outcome, grew = _peak_rss_of_decompress(HEADER.pack(LZ4, 200 << 20) + block[:100])
    assert outcome.startswith("IntegrityError: object x: lz4"), outcome
    assert grew < 64 << 20, f"decompress grew RSS by {grew >> 20} MiB"
