"""The block-fingerprint hasher: every kernel (AVX2, AVX-512, and the blake3-py path)
gives blake3-py's keyed digest of each 4 KiB block, for any count, alignment and length."""

from __future__ import annotations

import random
import shutil
import sysconfig

import blake3
import pytest

from diskvault.crypto import blockhash

BLOCK = 4096


def reference(key: bytes, data: bytes, outlen: int) -> bytes:
    whole = len(data) - len(data) % BLOCK
    return b"".join(blake3.blake3(data[i : i + BLOCK], key=key).digest(outlen)
                    for i in range(0, whole, BLOCK))


def kernels() -> list[int]:
    """Lane counts this CPU can run natively."""
    if blockhash._native is None:
        return []
    out = []
    for lanes in (8, 16):
        try:
            blockhash._native.keyed_blocks(bytes(32), b"", 8, lanes)
            out.append(lanes)
        except ValueError:
            pass
    return out


def test_native_kernel_is_built_where_a_compiler_is() -> None:
    # the install builds it optionally; a silent build failure would halve fingerprint
    # speed without any test failing
    if not shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]):
        pytest.skip("no C compiler: the blake3-py path is what this install has")
    assert blockhash._native is not None
    assert blockhash.native_lanes() in (0, 8, 16)


# block counts around the lane widths: none, fewer than a group, whole groups, whole
# groups and a rest (the padded last group), and a 4 MiB window
@pytest.mark.parametrize("nblocks", [0, 1, 7, 8, 9, 15, 16, 17, 33, 1024])
def test_every_kernel_matches_blake3(nblocks: int) -> None:
    rnd = random.Random(nblocks)
    key = rnd.randbytes(32)
    # a short tail the hasher must ignore
    data = rnd.randbytes(nblocks * BLOCK + rnd.choice([0, 1, 100, 4095]))
    if nblocks % 2:  # runs of zeros and repeated blocks among the random ones
        data = bytes(BLOCK * 3) + data[: BLOCK * 5] * 2 + data
    outlen = rnd.choice([1, 8, 16, 32])
    want = reference(key, data, outlen)
    assert blockhash.keyed_blocks_portable(key, data, outlen) == want
    assert blockhash.keyed_blocks(key, data, outlen) == want
    for lanes in kernels():
        assert blockhash._native.keyed_blocks(key, data, outlen, lanes) == want, lanes


def test_any_buffer_at_any_alignment() -> None:
    rnd = random.Random(7)
    key, raw = rnd.randbytes(32), bytearray(rnd.randbytes(40 * BLOCK + 3))
    for shift in (0, 1, 3, 17, 4093):
        view = memoryview(raw)[shift : shift + 33 * BLOCK]
        assert blockhash.keyed_blocks(key, view, 8) == reference(key, bytes(view), 8)


def test_bad_arguments_are_refused() -> None:
    if not kernels():
        pytest.skip("no native kernel on this install or CPU")
    with pytest.raises(ValueError, match="32 bytes"):
        blockhash._native.keyed_blocks(bytes(31), bytes(BLOCK), 8)
    for outlen in (0, 33):
        with pytest.raises(ValueError, match="outlen"):
            blockhash._native.keyed_blocks(bytes(32), bytes(BLOCK), outlen)
    for lanes in (1, 3, 32):
        with pytest.raises(ValueError, match="lane"):
            blockhash._native.keyed_blocks(bytes(32), bytes(BLOCK), 8, lanes)
