"""Keyed FastCDC: format version 2 repositories cut streams at secret boundaries;
version 1 repositories cut exactly as before (their old archives keep deduplicating)."""

from __future__ import annotations

import hashlib
import random

import pytest
from support import dv, init_repo

from diskvault.archive.items import read_item_stream, write_item_stream
from diskvault.archive.model import Item
from diskvault.archive.view import ArchiveView
from diskvault.chunking.base import ChunkerParams, make_chunker
from diskvault.crypto.ids import chunker_seed
from diskvault.repository.repo import Repository
from diskvault.source.content import DATA
from diskvault.storage.local import LocalStore

PARAMS = "fastcdc,16384,65536,262144"


def _cuts(data: bytes, seed: int, params: str = PARAMS) -> list[int]:
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        b = data[pos : pos + n]
        pos += len(b)
        return b

    return [len(c) for c in make_chunker(ChunkerParams.parse(params), seed).chunks(read)]


def test_unkeyed_boundaries_are_unchanged():
    """Seed 0 (version 1) must cut as every earlier diskvault did: pinned values."""
    lens = _cuts(random.Random(7).randbytes(2 << 20), 0)
    assert len(lens) == 25 and lens[:4] == [111090, 67285, 86090, 221300]
    assert hashlib.sha256(repr(lens).encode()).hexdigest()[:16] == "c07215ea455e71ba"


def test_seed_is_secret_per_key_and_moves_boundaries():
    a, b = chunker_seed(b"a" * 32), chunker_seed(b"b" * 32)
    assert a != b and a == chunker_seed(b"a" * 32)
    assert 0 < a < 1 << 63 and 0 < b < 1 << 63
    data = random.Random(8).randbytes(2 << 20)
    plain, ka, kb = _cuts(data, 0), _cuts(data, a), _cuts(data, b)
    assert sum(plain) == sum(ka) == sum(kb) == len(data)
    assert ka != plain and kb != plain and ka != kb


def test_item_stream_is_cut_with_the_seed():
    rnd = random.Random(9)
    items = [Item(path=f"dir/{rnd.randbytes(40).hex()}", type="file", mode=0o644, uid=0,
                  gid=0, mtime=rnd.randrange(1 << 40), size=rnd.randrange(1 << 30))
             for _ in range(30_000)]
    stored: dict[bytes, bytes] = {}

    def store(data: bytes) -> bytes:
        cid = hashlib.sha256(data).digest()
        stored[cid] = data
        return cid

    plain = write_item_stream(items, store)
    keyed = write_item_stream(items, store, chunker_seed(b"k" * 32))
    assert len(plain) > 3 and len(keyed) > 3
    assert [len(stored[c]) for c in plain] != [len(stored[c]) for c in keyed]
    back = list(read_item_stream(keyed, stored.__getitem__))
    assert [i.path for i in back] == [i.path for i in items]


def _data_cuts(path: str, archive: str) -> list[int]:
    with Repository.open(LocalStore(path), lambda creating: "secret", lock=None) as repo:
        (item,) = ArchiveView.open(repo, archive).items
        return [length for kind, length, _ in item.extents if kind == DATA]


@pytest.fixture
def stream() -> bytes:
    return random.Random(10).randbytes(3 << 20)


def test_v2_repositories_cut_differently_and_restore(tmp_path, stream):
    cuts = []
    for name in ("one", "two"):
        path = str(tmp_path / name)
        env = init_repo(path, "repokey")
        dv("create", "--chunker-params", PARAMS, "--stdin-name", "s", f"{path}::a", "-",
           input=stream, env=env)
        assert dv("extract", "--stdout", f"{path}::a", env=env).stdout == stream
        cuts.append(_data_cuts(path, "a"))
    assert sum(cuts[0]) == sum(cuts[1]) == len(stream)
    assert cuts[0] != cuts[1]
    assert _cuts(stream, 0) not in cuts  # neither uses the public gear table


def test_v1_repository_cuts_as_before(tmp_path, stream):
    path = str(tmp_path / "v1")
    repo = Repository.init(LocalStore(path), "repokey", lambda creating: "secret")
    repo.set_config("version", 1)  # a repository made by an older diskvault
    repo.close()
    env = {"DISKVAULT_PASSPHRASE": "secret"}
    with Repository.open(LocalStore(path), lambda creating: "secret", lock=None) as repo:
        assert repo.format_version == 1 and repo.chunker_seed == 0
    dv("create", "--chunker-params", PARAMS, "--stdin-name", "s", f"{path}::a", "-",
       input=stream, env=env)
    assert dv("extract", "--stdout", f"{path}::a", env=env).stdout == stream
    assert _data_cuts(path, "a") == _cuts(stream, 0)
