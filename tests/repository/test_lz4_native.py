"""The native LZ4 block compressor (repository/_lz4.c): python-lz4 reads what it writes,
for every kind and size of input; it is built where liblz4's headers are."""

from __future__ import annotations

import os
import random
import sysconfig

import lz4.block
import pytest

from diskvault.repository import compression
from diskvault.repository.compression import Compression, decompress

native = compression._native


def test_native_part_is_built_where_liblz4_headers_are():
    # optional at install: a silent build failure would only cost speed, no test would see it
    include = sysconfig.get_config_var("INCLUDEDIR") or "/usr/include"
    if not any(os.path.exists(os.path.join(d, "lz4.h")) for d in (include, "/usr/include")):
        pytest.skip("liblz4's headers are not installed: the python-lz4 path is used")
    assert native is not None and compression.lz4_compress is native.compress


def _inputs():
    rng = random.Random(11)
    text = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta"]) for _ in range(300000))
    yield b""
    yield b"x"
    yield bytes(4 << 20)
    yield rng.randbytes(4 << 20)
    yield text[: 4 << 20]
    yield rng.randbytes(1 << 20) + bytes(1 << 20) + text[: 1 << 20] + rng.randbytes(12345)
    for n in (1, 12, 13, 64, 4095, 4096, 65536 + 7):
        yield rng.randbytes(n)
        yield text[:n]


@pytest.mark.skipif(native is None, reason="the native LZ4 part is not built")
def test_native_output_is_lz4_that_python_lz4_reads():
    for data in _inputs():
        for buf in (data, bytearray(data), memoryview(data)):
            out = native.compress(buf)
            assert isinstance(out, bytes)
            assert lz4.block.decompress(out, uncompressed_size=len(data)) == data
            # about python-lz4's size: the same library, the same format
            ref = lz4.block.compress(data, store_size=False)
            assert abs(len(out) - len(ref)) <= max(16, len(ref) // 100)


@pytest.mark.skipif(native is None, reason="the native LZ4 part is not built")
def test_native_refuses_what_is_not_a_buffer():
    with pytest.raises(TypeError):
        native.compress("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["lz4", "auto,lz4"])
def test_objects_round_trip_with_either_compressor(monkeypatch, spec):
    for impl in (compression._python_lz4, compression.lz4_compress):
        monkeypatch.setattr(compression, "lz4_compress", impl)
        for data in _inputs():
            assert decompress(Compression.parse(spec).compress(data), "t") == data
