"""In-process helpers for the fault tests: small repositories, backups, exact restores."""

from __future__ import annotations

import io
import os
import random

from diskvault.archive.create import CreateOptions, create_archive
from diskvault.archive.extract import iter_pieces
from diskvault.archive.model import Item
from diskvault.archive.view import ArchiveView
from diskvault.chunking.base import ChunkerParams
from diskvault.errors import IntegrityError
from diskvault.repository.lock import SHARED
from diskvault.repository.repo import RandomBytes, Repository
from diskvault.source.content import DATA, StreamContent
from diskvault.source.paths import Meta, Source
from diskvault.storage.base import Store

PASS = "fault-test-passphrase"
CHUNK = 16 << 10


def passphrase(_creating: bool) -> str:
    return PASS


def new_repo(store: Store, encryption: str = "repokey", pack_size: int = 64 << 10,
             append_only: bool = False, random_bytes: RandomBytes = os.urandom) -> Repository:
    """``random_bytes``: e.g. ``random.Random(seed).randbytes`` — keys, ids and session ids
    (and so pack names and contents) then repeat from run to run."""
    return Repository.init(store, encryption, passphrase, append_only=append_only,
                           pack_size=pack_size, random_bytes=random_bytes)


def reopen(store: Store, lock: str | None = SHARED, tolerate: bool = True,
           random_bytes: RandomBytes = os.urandom) -> Repository:
    return Repository.open(store, passphrase, lock=lock, lock_wait=5.0, tolerate_damage=tolerate,
                           random_bytes=random_bytes)


def make_files(rng: random.Random, n: int, size: int, shared: bytes = b"") -> dict[str, bytes]:
    """Files mixing random data, a block shared between archives (dedup), and zeros."""
    files = {}
    for i in range(n):
        parts = [rng.randbytes(size // 2), shared, bytes(CHUNK * rng.randint(0, 2)),
                 rng.randbytes(rng.randint(1, size // 2))]
        rng.shuffle(parts)
        files[f"dir/file{i}.bin"] = b"".join(parts)
    return files


def backup(repo: Repository, name: str, files: dict[str, bytes], chunk: int = CHUNK) -> dict:
    sources = [Source(Meta(path=p, size=len(d)), StreamContent(io.BytesIO(d).read, what=p))
               for p, d in files.items()]
    meta, _ = create_archive(repo, name, sources,
                             CreateOptions(chunker=ChunkerParams.parse(f"fixed,{chunk}")))
    return meta


def archive_items(repo: Repository, name: str) -> list[Item]:
    return ArchiveView.open(repo, name).items


def item_truth(repo: Repository, item: Item, original: bytes) -> list[tuple[int, int]]:
    """Byte ranges of ``item`` that cannot be restored; every other byte is compared with
    ``original`` — wrong data returned as good fails the test right here."""
    bad, off = [], 0
    assert item.extents is not None
    for kind, length, cid in item.extents:
        if kind == DATA:
            try:
                data = repo.get_chunk(cid)
            except IntegrityError:
                bad.append((off, off + length - 1))
            else:
                assert data == original[off : off + length], f"{item.path}: WRONG DATA at {off}"
        else:
            assert original[off : off + length] == bytes(length), f"{item.path}: not zeros"
        off += length
    assert off == len(original), item.path
    return bad


def restore(repo: Repository, item: Item) -> bytes:
    """What extract produces for one item (raises IntegrityError naming a byte range)."""
    out = bytearray(item.size)
    for p in iter_pieces(repo, [item]):
        if p.data is not None:
            out[p.offset : p.offset + p.length] = p.data
    return bytes(out)


def assert_restores(repo: Repository, name: str, files: dict[str, bytes]) -> None:
    items = [i for i in archive_items(repo, name) if i.extents is not None]
    assert sorted(i.path for i in items) == sorted(files), name
    for i in items:
        assert restore(repo, i) == files[i.path], f"{name}: {i.path} differs"
