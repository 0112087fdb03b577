"""Delta building blocks: patches, extent records, changed-range arithmetic."""

from __future__ import annotations

import random

import numpy as np
import pytest

from diskvault.archive.delta import (
    BLOCK,
    Delta,
    Fingerprinter,
    changed_blocks,
    combine,
    encode_patch,
    materialize,
    merge_span,
    patch_blocks,
)
from diskvault.archive.model import DELTA, Extents
from diskvault.archive.parent import ChangedRanges
from diskvault.errors import IntegrityError


@pytest.mark.parametrize("length", [BLOCK, 10 * BLOCK + 123, 1024 * BLOCK])
def test_patches_rebuild_the_window_including_a_short_last_block(length):
    rng = random.Random(length)
    fp = Fingerprinter(b"k" * 32)
    base = rng.randbytes(length)
    versions, patches = [base], []
    for _ in range(3):
        new = bytearray(versions[-1])
        for i in rng.sample(range(-(-length // BLOCK)), max(1, length // BLOCK // 10)):
            a = i * BLOCK
            new[a : a + BLOCK] = rng.randbytes(len(new[a : a + BLOCK]))
        new = bytes(new)
        diff = changed_blocks(fp.blocks(new), fp.blocks(versions[-1]))
        assert len(diff)
        patches.append(encode_patch(length, diff, lambda i, d=new: d[i * BLOCK : (i + 1) * BLOCK]))
        versions.append(new)
    assert combine(length, base, patches) == versions[-1]
    store = {b"b" * 32: base, **{bytes([i]) * 32: p for i, p in enumerate(patches)}}
    d = Delta(b"b" * 32, tuple(bytes([i]) * 32 for i in range(3)), b"f" * 32)
    assert materialize(length, d, store.__getitem__) == versions[-1]
    merged = {}
    for p in patches:
        merged.update(patch_blocks(p))
    one = encode_patch(length, np.array(sorted(merged)), merged.__getitem__)
    assert combine(length, base, [one]) == versions[-1]


def test_damaged_patches_are_integrity_errors():
    base = bytes(3 * BLOCK)
    p = encode_patch(len(base), np.array([1]), lambda i: b"x" * BLOCK)
    for bad in (p[:-1], p + b"!", b"XXXX" + p[4:], p[:5]):
        with pytest.raises(IntegrityError):
            combine(len(base), base, [bad])
    with pytest.raises(IntegrityError):
        combine(len(base) + 1, base, [p])


def test_delta_extent_round_trip_and_truncation():
    e = Extents()
    d = Delta(b"b" * 32, (b"p" * 32, b"q" * 32), b"f" * 32, (5, 1))
    e.append(0, 10, b"a" * 32)
    e.append(DELTA, 20, delta=d)
    e.append(1, 5)
    assert [r[3] for r in e.records()] == [None, d, None]
    assert list(e.chunk_ids()) == [b"a" * 32, b"b" * 32, b"p" * 32, b"q" * 32]
    assert e.total() == 35 and e.num_chunks() == 2
    raw = bytes(e)
    for cut in range(42, len(raw) - 9):  # every cut inside the delta record
        with pytest.raises(IntegrityError):
            list(Extents(raw[:cut]).records())


def test_merge_span_folds_the_newest_run_of_equal_patches():
    assert merge_span((1,) * 12) == 12
    assert merge_span((13, 1, 1, 1)) == 3
    assert merge_span((13, 12)) == 1


def test_changed_ranges_blocks_and_shift():
    c = ChangedRanges(100 * BLOCK, "p", [(5, 10), (BLOCK - 1, 2), (3 * BLOCK, 2 * BLOCK),
                                         (50 * BLOCK, 1)])
    assert c.blocks_in(0, 8 * BLOCK) == [0, 1, 3, 4]
    assert c.blocks_in(4 * BLOCK, 8 * BLOCK) == [0]
    assert c.blocks_in(8 * BLOCK, 50 * BLOCK) == []
    s = c.shifted(3 * BLOCK, 48 * BLOCK)
    assert s.blocks_in(0, 48 * BLOCK) == [0, 1, 47]
    assert c.total() == 10 + 2 + 2 * BLOCK + 1


@pytest.mark.parametrize("length", [0, 1, BLOCK, 3 * BLOCK + 5, 64 * BLOCK, 33 * BLOCK + 100])
def test_fingerprints_are_the_format_definition(length):
    """docs/format.md: 8 bytes of BLAKE3, keyed with a key derived from the id key, of
    each 4 KiB block (a short last block as is) — whatever shortcut computes them, and
    the same in threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    import blake3

    id_key = bytes(range(32))
    fp = Fingerprinter(id_key)
    key = blake3.blake3(id_key, derive_key_context="diskvault 2 block fingerprint").digest()
    data = random.Random(length).randbytes(length)
    want = b"".join(blake3.blake3(data[i : i + BLOCK], key=key).digest(8)
                    for i in range(0, length, BLOCK))
    assert fp.blocks(data) == want
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(fp.blocks, [data] * 8)) == {want}
    assert fp.zeros(length) == fp.blocks(bytes(length))
