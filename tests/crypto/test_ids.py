"""Chunk ids by format version: version 3 ids are keyed BLAKE3 over the length and the
4 KiB block digests (docs/format.md, Chunks), the same with or without the native kernel;
their digests carry the block fingerprints; versions 1 and 2 keep the plain keyed hash."""

from __future__ import annotations

import os
import random
import struct

import blake3
import pytest

from diskvault.archive.delta import Fingerprinter
from diskvault.crypto import blockhash
from diskvault.crypto.ids import BlockIdHasher, IdHasher, id_hasher

BLOCK = 4096
KEY = bytes(range(32))
# every length class: empty, one short block, whole blocks, a short tail, fewer and more
# blocks than a SIMD group (8 or 16 lanes), a window and a half
LENGTHS = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 7 * BLOCK, 16 * BLOCK + 5, 64 * BLOCK,
           (1 << 20) + 123, 6 << 20]


def spec_id(id_key: bytes, data: bytes) -> bytes:
    """The definition in docs/format.md, written out with blake3-py alone."""
    dkey = blake3.blake3(id_key, derive_key_context="diskvault 2 block fingerprint").digest()
    okey = blake3.blake3(id_key,
                         derive_key_context="diskvault 3 chunk id over block digests").digest()
    digests = b"".join(blake3.blake3(data[i : i + BLOCK], key=dkey).digest()
                       for i in range(0, len(data), BLOCK))
    return blake3.blake3(struct.pack("<Q", len(data)) + digests, key=okey).digest()


@pytest.mark.parametrize("native", [True, False], ids=["native", "portable"])
def test_version_3_id_is_the_documented_hash(monkeypatch, native):
    if not native:
        monkeypatch.setattr(blockhash, "_LANES", 0)
    elif not blockhash.native_lanes():
        pytest.skip("the native kernel is not built or this CPU has none")
    rng = random.Random(3)
    ids = BlockIdHasher(KEY)
    for n in LENGTHS:
        data = rng.randbytes(n)
        assert ids(data) == spec_id(KEY, data), n
        assert ids(memoryview(bytearray(data))) == ids(data)


def test_known_answer():
    # pinned: a change of any part of the definition would orphan every version 3 chunk
    data = bytes(range(256)) * 100  # 25,600 bytes: six whole blocks and a tail
    assert BlockIdHasher(KEY)(data).hex() == (
        "ef81717694710daf3408efdd2c142204455d67f97d6babad1c5a04061aac1ca1")
    assert IdHasher(KEY)(data) == blake3.blake3(data, key=KEY).digest()


def test_digests_carry_the_fingerprints():
    rng = random.Random(4)
    ids, fp = BlockIdHasher(KEY), Fingerprinter(KEY)
    for n in LENGTHS:
        data = rng.randbytes(n)
        assert fp.from_digests(ids.digests(data)) == fp.blocks(data), n


def test_versions_choose_their_definition():
    data = random.Random(5).randbytes(3 * BLOCK + 9)
    plain = blake3.blake3(data, key=KEY).digest()
    assert id_hasher(KEY, 1)(data) == id_hasher(KEY, 2)(data) == plain
    assert id_hasher(KEY, 3)(data) == spec_id(KEY, data) != plain
    # equal content, different lengths (a zero tail): different ids
    assert id_hasher(KEY, 3)(bytes(BLOCK)) != id_hasher(KEY, 3)(bytes(BLOCK + 1))


def test_a_newer_format_version_is_refused_with_one_line(tmp_path):
    """What an older diskvault does with our version 3 repositories, one version on."""
    from support import dv, init_repo

    from diskvault.repository.repo import Repository
    from diskvault.storage.local import LocalStore

    path = str(tmp_path / "repo")
    env = init_repo(path, "none")
    with Repository.open(LocalStore(path), lambda creating: "", lock=None) as repo:
        assert repo.format_version == 3
        repo.set_config("version", 4)
    before = sorted(os.walk(path))
    r = dv("list", path, env=env, check=False)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert r.stderr.decode().strip().splitlines() == [
        "diskvault: error: repository has format version 4, this diskvault understands 1, 2 and 3: "
        "upgrade diskvault"]
    assert sorted(os.walk(path)) == before
