"""The random-access view (archive/reader.py) on a real local repository.

Every read is compared with ``extract --stdout`` of the same item, which restore tests
already verify against the source byte for byte.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import dv, init_repo, make_vm_image

from diskvault.archive.reader import DISK_EXPORT, ArchiveReaders, open_archive_readers
from diskvault.errors import IntegrityError, UsageError
from diskvault.repository.pack import pack_key
from diskvault.repository.repo import Repository
from diskvault.storage.url import open_store

CHUNK = 64 << 10


@contextmanager
def readers(repo_path: str, archive: str, **kw) -> Iterator[ArchiveReaders]:
    repo = Repository.open(open_store(repo_path), lambda creating: "secret")
    try:
        with open_archive_readers(repo, archive, **kw) as r:
            yield r
    finally:
        repo.close()


def image_archive(tmp: Path, mib: int = 12, encryption: str = "repokey") -> tuple[str, dict, bytes]:
    """A repository with archive ``a`` of a VM-like image (small fixed chunks, so reads
    cross many chunks); returns (repo, env, the bytes ``extract --stdout`` gives)."""
    repo, img = str(tmp / "repo"), str(tmp / "vm.img")
    make_vm_image(img, mib)
    env = init_repo(repo, encryption)
    dv("create", "--chunker-params", f"fixed,{CHUNK}", f"{repo}::a", img, env=env)
    want = dv("extract", "--stdout", f"{repo}::a", env=env).stdout
    assert len(want) == mib << 20
    return repo, env, want


def test_random_reads_match_extract(tmp_path: Path) -> None:
    repo, env, want = image_archive(tmp_path)
    rnd = random.Random(10)
    with readers(repo, "a", cache_bytes=8 * CHUNK) as ar:
        (r,) = ar.items.values()
        assert ar.default() is r and ar.disk is None
        assert r.size == len(want)
        for _ in range(400):
            off = rnd.randrange(len(want) + 100)
            n = rnd.choice([1, 511, 4096, CHUNK, 3 * CHUNK + 17, rnd.randrange(1 << 20)])
            assert r.read(off, n) == want[off : off + n], (off, n)
        assert r.read(0, len(want) + 5) == want  # short only at the end
        assert r.read(len(want), 10) == b""
        with pytest.raises(UsageError):
            r.read(-1, 10)


def test_extents_report_sparse_ranges(tmp_path: Path) -> None:
    repo, env, want = image_archive(tmp_path, encryption="none")
    with readers(repo, "a") as ar:
        (r,) = ar.items.values()
        runs = list(r.extents())
        pos = 0
        for off, n, kind in runs:
            assert off == pos and n > 0
            if kind != "data":
                assert want[off : off + n] == bytes(n)
            pos += n
        assert pos == len(want)
        # make_vm_image: MiB 2 of every 5 is written zeros, MiB 3 a hole: 2 MiB runs
        zero = [(o, n) for o, n, k in runs if k == "zero"]
        assert (2 << 20, 2 << 20) in zero
        # neighbours of one kind are merged; a sub-range is clipped to the range
        assert all(a[2] != b[2] for a, b in zip(runs, runs[1:], strict=False))
        assert list(r.extents((2 << 20) + 5, 100)) == [((2 << 20) + 5, 100, "zero")]
        sub = list(r.extents(100, 3 << 20))
        assert sub[0][0] == 100 and sum(n for _, n, _ in sub) == 3 << 20
        # zero ranges are never fetched
        before = ar.cache.stats.misses
        assert r.read(2 << 20, 2 << 20) == bytes(2 << 20)
        assert ar.cache.stats.misses == before


def test_cache_is_bounded_and_hits(tmp_path: Path) -> None:
    repo, env, want = image_archive(tmp_path, encryption="none")
    cap = 5 * CHUNK
    with readers(repo, "a", cache_bytes=cap, readahead=2 * CHUNK) as ar:
        (r,) = ar.items.values()
        for off in range(0, len(want), 4096 * 7):
            assert r.read(off, 4096 * 7) == want[off : off + 4096 * 7]
        st = ar.cache.stats
        assert st.peak_bytes <= cap and st.bytes <= cap
        assert st.evictions > 0
        # many small reads per chunk: each chunk fetched about once (read-ahead included)
        chunks = r.item.extents.num_chunks()
        assert st.misses <= chunks + 2
        assert st.hits > st.misses


def test_concurrent_readers(tmp_path: Path) -> None:
    repo, env, want = image_archive(tmp_path)
    errors: list[BaseException] = []
    with readers(repo, "a", cache_bytes=16 * CHUNK) as ar:
        (r,) = ar.items.values()
        start = threading.Barrier(8)

        def work(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                start.wait(timeout=60)
                for _ in range(150):
                    off = rnd.randrange(len(want))
                    n = rnd.randrange(1, 300_000)
                    got = r.read(off, n)
                    if got != want[off : off + n]:
                        raise AssertionError(f"wrong bytes at {off}+{n}")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_damaged_chunk_fails_exactly_its_range(tmp_path: Path) -> None:
    repo, env, want = image_archive(tmp_path, encryption="none")
    # damage the chunk holding bytes of MiB 0 (random data) at 3 × CHUNK
    with readers(repo, "a") as ar:
        (r,) = ar.items.values()
        ids = [cid for kind, n, cid in r.item.extents if cid is not None]
        cid = ids[3]
        assert r.read(3 * CHUNK, 1) == want[3 * CHUNK : 3 * CHUNK + 1]
    rp = Repository.open(open_store(repo), lambda c: "secret")
    loc = rp.index.get(cid)
    rp.close()
    pack = Path(repo) / pack_key(loc.pack)
    buf = bytearray(pack.read_bytes())
    buf[loc.offset + loc.length // 2] ^= 0x40
    pack.write_bytes(bytes(buf))
    with readers(repo, "a") as ar:
        (r,) = ar.items.values()
        lo, hi = 3 * CHUNK, 4 * CHUNK - 1
        for off, n in [(lo, 1), (hi, 1), (lo - 10, 20), (0, len(want))]:
            with pytest.raises(IntegrityError, match=f"vm.img: bytes {lo}-{hi} cannot be read"):
                r.read(off, n)
        # the neighbours stay readable, again and again (failures are not cached)
        assert r.read(0, lo) == want[:lo]
        assert r.read(hi + 1, CHUNK) == want[hi + 1 : hi + 1 + CHUNK]
        with pytest.raises(IntegrityError):
            r.read(lo + 5, 5)


def disk_archive(tmp: Path) -> tuple[str, dict, bytes]:
    from archive.test_disk_images import gpt_disk

    disk = gpt_disk(tmp)
    repo = str(tmp / "repo")
    env = init_repo(repo, "none")
    dv("disk", "backup", f"{repo}::d", disk.path, env=env)
    want = dv("extract", "--stdout", f"{repo}::d", env=env).stdout
    assert len(want) == disk.size
    return repo, env, want


def test_whole_disk_is_the_items_concatenated(tmp_path: Path) -> None:
    repo, env, want = disk_archive(tmp_path)
    rnd = random.Random(3)
    with readers(repo, "d") as ar:
        disk = ar.disk
        assert disk is not None and ar.default() is disk
        assert ar.get(DISK_EXPORT) is disk and list(ar.exports())[0] == DISK_EXPORT
        assert disk.size == len(want)
        assert disk.read(0, len(want)) == want
        for _ in range(200):  # reads across item boundaries
            off = rnd.randrange(len(want))
            n = rnd.randrange(1, 3 << 20)
            assert disk.read(off, n) == want[off : off + n]
        runs = list(disk.extents())
        assert sum(n for _, n, _ in runs) == len(want)
        assert all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))
        assert any(k == "unused" for _, _, k in runs)  # free ext4/FAT blocks
        for off, n, kind in runs:
            if kind != "data":
                assert want[off : off + n] == bytes(n)
        part = ar.get("disk/part1")
        start = part.item.disk_offset
        assert part.read(0, part.size) == want[start : start + part.size]
        with pytest.raises(UsageError, match="has no item 'disk/part9'"):
            ar.get("disk/part9")
