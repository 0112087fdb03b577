"""Block-level incrementals: delta extents, block fingerprints, --changed-extents.

Images are seeded random data (incompressible, so stored bytes are what deltas save) with
a zero tail; "changed bytes" are the 4 KiB blocks that differ at the same offset. Every
restore is compared byte for byte with the image it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from support import CountingStore, dv, sha256_file

BLOCK = 4096
MiB = 1 << 20


def make_image(path, size: int, used: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.write(rng.randbytes(used) + bytes(size - used))


def churn(path, rng: random.Random, used: int, fraction: float, clustered: bool) -> None:
    """Rewrite ``fraction`` of the used 4 KiB blocks: scattered single blocks, or runs of
    4 KiB – 1 MiB."""
    target = int(used // BLOCK * fraction)
    with open(path, "r+b") as f:
        if not clustered:
            for b in rng.sample(range(used // BLOCK), target):
                f.seek(b * BLOCK)
                f.write(rng.randbytes(BLOCK))
            return
        done = 0
        while done < target:
            n = min(rng.randint(1, 256), target - done)
            b = rng.randrange(0, used // BLOCK - n)
            f.seek(b * BLOCK)
            f.write(rng.randbytes(n * BLOCK))
            done += n


def changed_bytes(old: bytes, new: bytes) -> int:
    a = np.frombuffer(old, np.uint8).reshape(-1, BLOCK)
    b = np.frombuffer(new, np.uint8).reshape(-1, BLOCK)
    return int((a != b).any(axis=1).sum()) * BLOCK


def repo_bytes(repo) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(repo) for f in fs)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def restored(repo, archive: str) -> bytes:
    return dv("extract", "--stdout", f"{repo}::{archive}").stdout


@pytest.fixture
def repo(tmp_path):
    r = str(tmp_path / "repo")
    dv("init", "-e", "none", r)
    return r


@pytest.fixture(params=[2, 3], ids=["v2", "v3"])
def any_version_repo(tmp_path, request):
    """A repository of each format version with deltas: version 2 hashes a window twice
    (its id, then its fingerprints unless the id is the parent's), version 3 once."""
    from diskvault.repository.repo import Repository
    from diskvault.storage.local import LocalStore

    r = str(tmp_path / "repo")
    dv("init", "-e", "none", r)
    if request.param < 3:
        with Repository.open(LocalStore(r), lambda creating: "", lock=None) as opened:
            opened.set_config("version", request.param)
    return r


@pytest.mark.parametrize("clustered", [False, True], ids=["scattered", "clustered"])
def test_second_backup_stores_about_the_changed_bytes(tmp_path, any_version_repo, clustered):
    repo = any_version_repo
    img = tmp_path / "vm.img"
    used = 40 * MiB
    make_image(img, 48 * MiB, used, seed=1)
    dv("create", f"{repo}::a1", str(img))
    old = read(img)
    churn(img, random.Random(2 + clustered), used, 0.02, clustered)
    new = read(img)
    changed = changed_bytes(old, new)
    before = repo_bytes(repo)
    out = json.loads(dv("create", "--json", f"{repo}::a2", str(img)).stdout)
    grown = repo_bytes(repo) - before
    stats = out["archive"]["stats"]
    print(f"changed {changed} stored {grown} ({grown / changed:.2f}x) delta {stats['delta']}")
    assert stats["delta_blocks"] == changed // BLOCK
    assert grown <= 1.5 * changed
    assert restored(repo, "a2") == new
    assert restored(repo, "a1") == old
    dv("check", "--verify-data", repo)


def _chain(tmp_path, repo, days: int) -> None:
    img = tmp_path / "disk.img"
    used = 16 * MiB
    make_image(img, 20 * MiB, used, seed=7)
    rng = random.Random(8)
    dv("create", f"{repo}::day00", str(img))
    truth = {"day00": hashlib.sha256(read(img)).hexdigest()}
    total_changed = 0
    start = repo_bytes(repo)
    for d in range(1, days):
        old = read(img)
        churn(img, rng, used, 0.02, clustered=False)
        new = read(img)
        total_changed += changed_bytes(old, new)
        name = f"day{d:02d}"
        dv("create", f"{repo}::{name}", str(img))
        truth[name] = hashlib.sha256(new).hexdigest()
    growth = repo_bytes(repo) - start
    print(f"{days} days: changed {total_changed}, grown {growth} "
          f"({growth / total_changed:.2f}x)")
    assert growth <= 2 * total_changed
    for name, digest in truth.items():
        assert hashlib.sha256(restored(repo, name)).hexdigest() == digest, name
    # the oldest archives hold the bases of every later delta: prune them, compact
    # (by name: --keep-last is --keep-secondly, as in Borg, and a fast machine makes
    # two of these archives in one second)
    keep = max(2, days // 3)
    oldest = sorted(truth)[:-keep]
    dv("delete", f"{repo}::{oldest[0]}", *oldest[1:])
    before = repo_bytes(repo)
    dv("compact", repo)
    assert repo_bytes(repo) < before  # old patches and fingerprints were freed
    left = dv("list", "--short", repo).stdout.decode().split()
    assert left == sorted(truth)[-keep:]
    r = dv("check", "--verify-data", repo)
    assert b"no problems" in r.stdout + r.stderr
    for name in left:
        assert hashlib.sha256(restored(repo, name)).hexdigest() == truth[name], name


def test_daily_chain_prune_compact(tmp_path, repo):
    _chain(tmp_path, repo, 10)


@pytest.mark.slow
def test_daily_chain_30_days(tmp_path, repo):
    _chain(tmp_path, repo, 30)


def test_changed_extents_reads_only_the_listed_ranges(tmp_path, repo):
    img = tmp_path / "vm.img"
    size, used = 48 * MiB, 40 * MiB
    make_image(img, size, used, seed=3)
    dv("create", f"{repo}::base", str(img))
    rng = random.Random(4)
    extents = []
    with open(img, "r+b") as f:
        for _ in range(20):
            off = rng.randrange(0, used - 256 * 1024)
            n = rng.randint(1, 200_000)
            f.seek(off)
            f.write(rng.randbytes(n))
            extents.append([off, n])
    listing = tmp_path / "changed.json"
    listing.write_text(json.dumps({"size": size, "parent": "base", "extents": extents}))
    out = json.loads(dv("create", "--json", "--parent", "base", "--changed-extents",
                        str(listing), f"{repo}::next", str(img)).stdout)
    stats = out["archive"]["stats"]
    blocks = set()
    for off, n in extents:
        blocks.update(range(off // BLOCK, (off + n - 1) // BLOCK + 1))
    print(f"read {stats['read']} of {size} bytes; listed {sum(n for _, n in extents)}")
    assert stats["read"] == len(blocks) * BLOCK
    assert restored(repo, "next") == read(img)
    dv("check", "--verify-data", repo)

    # a list for other content, or relative to another archive, is refused: nothing written
    for doc, why in (({"size": size + 4096, "parent": "base", "extents": []}, b"other content"),
                     ({"size": size, "parent": "next", "extents": []}, b"relative to"),
                     ({"size": size, "parent": "base", "extents": [[size - 10, 20]]},
                      b"outside")):
        listing.write_text(json.dumps(doc))
        before = repo_bytes(repo)
        r = dv("create", "--parent", "base", "--changed-extents", str(listing),
               f"{repo}::bad", str(img), check=False)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and b"Traceback" not in r.stderr
        assert repo_bytes(repo) == before


def test_changed_extents_missing_a_change_is_the_users_word(tmp_path, repo):
    """Documented: a block left out of the list keeps the parent's content."""
    img = tmp_path / "vm.img"
    make_image(img, 8 * MiB, 8 * MiB, seed=5)
    dv("create", f"{repo}::base", str(img))
    old = read(img)
    with open(img, "r+b") as f:
        f.seek(BLOCK * 10)
        f.write(b"\xff" * BLOCK)
        f.seek(BLOCK * 900)
        f.write(b"\xee" * BLOCK)
    listing = tmp_path / "changed.json"
    listing.write_text(json.dumps({"size": 8 * MiB, "parent": "base",
                                   "extents": [[BLOCK * 10, BLOCK]]}))
    dv("create", "--parent", "base", "--changed-extents", str(listing), f"{repo}::next",
       str(img))
    got = restored(repo, "next")
    assert got[BLOCK * 10 : BLOCK * 11] == b"\xff" * BLOCK
    assert got[BLOCK * 900 : BLOCK * 901] == old[BLOCK * 900 : BLOCK * 901]


def test_no_parent_and_version_1(tmp_path, repo):
    img = tmp_path / "vm.img"
    make_image(img, 8 * MiB, 8 * MiB, seed=6)
    dv("create", f"{repo}::a1", str(img))
    churn(img, random.Random(1), 8 * MiB, 0.02, False)
    out = json.loads(dv("create", "--json", "--no-parent", f"{repo}::a2", str(img)).stdout)
    assert out["archive"]["stats"]["delta"] == 0
    assert restored(repo, "a2") == read(img)


def _delta_chunks(repo, archive: str):
    """(item offset, length, Delta) of every delta extent of the archive's image."""
    from diskvault.archive.view import ArchiveView
    from diskvault.repository.repo import Repository
    from diskvault.storage.url import open_store

    r = Repository.open(open_store(repo), lambda _c: "")
    try:
        item = next(i for i in ArchiveView.open(r, archive).items if i.extents is not None)
        out, off = [], 0
        for _kind, n, _cid, delta in item.extents.records():
            if delta is not None:
                out.append((off, n, delta, r.index.get(delta.base), r.index.get(delta.patches[-1])))
            off += n
        return out
    finally:
        r.close()


@pytest.mark.parametrize("what", ["base", "patch"])
def test_damaged_base_or_patch_is_named_with_its_byte_range(tmp_path, repo, what):
    img = tmp_path / "vm.img"
    make_image(img, 16 * MiB, 16 * MiB, seed=9)
    dv("create", f"{repo}::a1", str(img))
    first = read(img)
    churn(img, random.Random(10), 16 * MiB, 0.02, False)
    dv("create", f"{repo}::a2", str(img))
    off, n, _delta, base_loc, patch_loc = _delta_chunks(repo, "a2")[1]
    loc = base_loc if what == "base" else patch_loc
    pack = os.path.join(repo, "packs", loc.pack[:2], loc.pack)
    os.chmod(pack, 0o600)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        b = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([b[0] ^ 0x40]))
    r = dv("check", "--verify-data", repo, check=False)
    text = (r.stdout + r.stderr).decode()
    assert r.returncode != 0
    assert "'a2'" in text and f"bytes {off}-{off + n - 1}" in text, text
    assert ("'a1'" in text) == (what == "base")  # a damaged patch leaves the parent intact
    r = dv("extract", "--stdout", f"{repo}::a2", check=False)
    assert r.returncode != 0 and f"bytes {off}-{off + n - 1}".encode() in r.stderr
    if what == "patch":
        assert restored(repo, "a1") == first


def test_sigkill_during_a_delta_backup_loses_nothing_committed(tmp_path):
    repo = str(tmp_path / "repo")
    dv("init", "-e", "none", "--pack-size", "256KiB", repo)
    img = tmp_path / "vm.img"
    make_image(img, 64 * MiB, 64 * MiB, seed=11)
    dv("create", f"{repo}::a1", str(img))
    first = read(img)
    churn(img, random.Random(12), 64 * MiB, 0.05, False)
    packs_before = {f for _, _, fs in os.walk(os.path.join(repo, "packs")) for f in fs}
    p = subprocess.Popen([sys.executable, "-m", "diskvault", "create", f"{repo}::a2",
                          str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # kill once the delta backup has written a pack of its own (poll; no fixed sleep)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            now = {f for _, _, fs in os.walk(os.path.join(repo, "packs")) for f in fs}
            if now - packs_before:
                break
            time.sleep(0.005)
        killed = p.poll() is None
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert restored(repo, "a1") == first
    r = dv("check", "--verify-data", repo, check=False)
    assert b"no problems" in r.stdout + r.stderr, r.stdout + r.stderr
    names = dv("list", "--short", repo).stdout.decode().split()
    assert killed, "the backup ended before its first pack was seen: no crash was tested"
    assert names == ["a1"]
    dv("create", f"{repo}::a3", str(img))
    assert restored(repo, "a3") == read(img)


@pytest.mark.skipif(not shutil.which("sfdisk"), reason="needs sfdisk")
def test_disk_backup_deltas_and_changed_extents_in_disk_offsets(tmp_path, repo):
    img = str(tmp_path / "disk.img")
    make_image(img, 40 * MiB, 40 * MiB, seed=13)  # every byte random, the table over it
    subprocess.run(["sfdisk", "-q", img], input=b"label: gpt\n,16MiB\n,\n", check=True)
    dv("disk", "backup", f"{repo}::d1", img)
    old = read(img)
    rng = random.Random(14)
    out = json.loads(subprocess.run(["sfdisk", "--json", img], capture_output=True,
                                    check=True).stdout)["partitiontable"]["partitions"]
    p2, p2_size = out[1]["start"] * 512, out[1]["size"] * 512
    extents = []
    with open(img, "r+b") as f:
        for _ in range(30):  # scattered blocks inside partition 2
            at = p2 + rng.randrange(0, p2_size // BLOCK) * BLOCK
            f.seek(at)
            f.write(rng.randbytes(BLOCK))
            extents.append([at, BLOCK])
    new = read(img)
    j = json.loads(dv("disk", "backup", "--json", f"{repo}::d2", img).stdout)
    assert j["archive"]["stats"]["delta_blocks"] == changed_bytes(old, new) // BLOCK
    assert restored(repo, "d2") == new
    listing = tmp_path / "changed.json"
    listing.write_text(json.dumps({"size": 40 * MiB, "parent": "d1", "extents": extents}))
    j = json.loads(dv("disk", "backup", "--json", "--parent", "d1", "--changed-extents",
                      str(listing), f"{repo}::d3", img).stdout)
    assert j["archive"]["stats"]["read"] == len({e[0] for e in extents}) * BLOCK
    assert restored(repo, "d3") == new
    target = str(tmp_path / "restored.img")
    dv("disk", "restore", f"{repo}::d3", target)
    assert read(target) == new
    dv("check", "--verify-data", repo)


def test_version_1_repository_stores_whole_windows_with_a_note(tmp_path, monkeypatch):
    from diskvault.repository import repo as repo_mod
    from diskvault.storage.url import open_store

    monkeypatch.setattr(repo_mod, "FORMAT_VERSION", 1)
    path = str(tmp_path / "v1")
    repo_mod.Repository.init(open_store(path), "none", lambda _c: "").close()
    img = tmp_path / "vm.img"
    make_image(img, 8 * MiB, 8 * MiB, seed=15)
    dv("create", f"{path}::a1", str(img))
    churn(img, random.Random(16), 8 * MiB, 0.02, False)
    r = dv("create", "--json", "--parent", "a1", f"{path}::a2", str(img))
    assert b"format version 2" in r.stderr and len(r.stderr.splitlines()) == 1
    assert json.loads(r.stdout)["archive"]["stats"]["delta"] == 0
    assert restored(path, "a2") == read(img)
    dv("check", "--verify-data", path)


def test_repair_marks_the_range_of_a_delta_whose_base_is_gone(tmp_path):
    repo = str(tmp_path / "repo")
    dv("init", "-e", "none", "--pack-size", "256KiB", repo)  # a chunk per pack
    img = tmp_path / "vm.img"
    make_image(img, 16 * MiB, 16 * MiB, seed=17)
    dv("create", f"{repo}::a1", str(img))
    churn(img, random.Random(18), 16 * MiB, 0.02, False)
    dv("create", f"{repo}::a2", str(img))
    deltas = _delta_chunks(repo, "a2")
    off, n, _delta, base_loc, _ = deltas[0]
    os.remove(os.path.join(repo, "packs", base_loc.pack[:2], base_loc.pack))
    r = dv("check", "--repair", "--yes", repo, check=False)
    assert b"a2" in r.stdout + r.stderr
    r = dv("check", repo, check=False)
    text = (r.stdout + r.stderr).decode()
    assert f"bytes {off}-{off + n - 1}" in text, text
    r = dv("extract", "--stdout", f"{repo}::a2", check=False)
    assert r.returncode != 0 and f"bytes {off}-{off + n - 1}".encode() in r.stderr
    # a new backup is not built on the lost base: it stores that window whole
    dv("create", f"{repo}::a3", str(img))
    assert restored(repo, "a3") == read(img)


def test_second_backup_downloads_no_pack_data_with_the_fingerprint_cache(tmp_path):
    """Remote store: block fingerprints come from the local cache; nothing of the parent
    (data, patches or fingerprints) is downloaded."""
    from diskvault.archive.create import CreateOptions, create_archive
    from diskvault.archive.parent import ParentArchive
    from diskvault.repository.repo import Repository
    from diskvault.source.paths import SourceOptions, walk

    img = tmp_path / "vm.img"
    make_image(img, 16 * MiB, 16 * MiB, seed=19)
    store = CountingStore(str(tmp_path / "repo"), remote=True)
    repo = Repository.init(store, "repokey", lambda _c: "pw")
    create_archive(repo, "a1", walk([str(img)], SourceOptions()), CreateOptions())
    repo.close()
    churn(img, random.Random(20), 16 * MiB, 0.02, False)
    repo = Repository.open(store, lambda _c: "pw")
    try:
        opts = CreateOptions(parent=ParentArchive.load(repo, "a1"))
        store.loads.clear()
        _, stats = create_archive(repo, "a2", walk([str(img)], SourceOptions()), opts)
        assert stats.delta_blocks == int(4096 * 0.02)
        assert not [n for n in store.loads if n.startswith("packs/")], store.loads
        cached = os.listdir(os.path.join(repo.cache.dir, "fingerprints"))
        assert len(cached) == 1  # a1's stream was superseded by a2's
    finally:
        repo.close()
    r = dv("extract", "--stdout", f"{tmp_path / 'repo'}::a2", env={"DISKVAULT_PASSPHRASE": "pw"})
    assert r.stdout == read(img)


def _peak_rss_mib(*args: str) -> float:
    """Peak RSS of one CLI run (a fresh child: ru_maxrss of the waited-for process)."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run([sys.executable, '-m', 'diskvault', *sys.argv[1:]], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, check=True)
    return int(r.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_image(tmp_path, repo):
    """Sparse images with a 4 MiB data window every 256 MiB: 1 GiB and 16 GiB."""
    peaks = {}
    for gib in (1, 16):
        img = str(tmp_path / f"disk{gib}.img")
        rng = random.Random(gib)
        with open(img, "wb") as f:
            f.truncate(gib << 30)
            for at in range(0, gib << 30, 256 * MiB):
                f.seek(at)
                f.write(rng.randbytes(4 * MiB))
        dv("create", f"{repo}::g{gib}a", img)
        with open(img, "r+b") as f:
            for at in range(0, gib << 30, 256 * MiB):
                f.seek(at + rng.randrange(1024) * BLOCK)
                f.write(rng.randbytes(BLOCK))
        peaks[gib] = _peak_rss_mib("create", f"{repo}::g{gib}b", img)
        p = subprocess.Popen([sys.executable, "-m", "diskvault", "extract", "--stdout",
                              f"{repo}::g{gib}b"], stdout=subprocess.PIPE)
        h = hashlib.sha256()
        assert p.stdout is not None
        while block := p.stdout.read(16 * MiB):
            h.update(block)
        assert p.wait() == 0
        assert h.hexdigest() == sha256_file(img)
        os.unlink(img)
    print(f"peak RSS of the second backup: {peaks}")
    assert peaks[16] <= 300
    assert peaks[16] - peaks[1] <= 64


def test_random_access_reader_serves_delta_extents(tmp_path, repo):
    """The mount/NBD reader (archive/reader.py) reads delta windows through
    delta.materialize: random ranges, across window edges, equal the image."""
    from diskvault.archive.reader import ChunkCache, ItemReader
    from diskvault.archive.view import ArchiveView
    from diskvault.repository.repo import Repository
    from diskvault.storage.url import open_store

    img = tmp_path / "vm.img"
    make_image(img, 16 * MiB, 12 * MiB, seed=21)
    dv("create", f"{repo}::a1", str(img))
    churn(img, random.Random(22), 12 * MiB, 0.02, False)
    dv("create", f"{repo}::a2", str(img))
    data = read(img)
    r = Repository.open(open_store(repo), lambda _c: "")
    cache = ChunkCache(r, capacity=64 * MiB)
    try:
        item = next(i for i in ArchiveView.open(r, "a2").items if i.extents is not None)
        assert any(d is not None for *_, d in item.extents.records())
        reader = ItemReader(item, cache)
        rng = random.Random(23)
        for _ in range(200):
            off = rng.randrange(len(data))
            n = rng.choice([1, 512, BLOCK, 3 * MiB, 9 * MiB])
            assert reader.read(off, n) == data[off : off + n]
        assert reader.read(0, len(data)) == data
    finally:
        cache.close()
        r.close()


@pytest.mark.parametrize("version", [2, 3])
def test_fingerprints_are_made_only_for_items_that_keep_them(tmp_path, monkeypatch, version):
    """A stream (content-defined chunks) keeps no fingerprints: version 2 computed them
    for every chunk anyway, a second hashing pass thrown away; a file cut into fixed
    windows keeps them. Version 3 takes them from its ids' block digests instead."""
    import io

    from faults.faultkit import new_repo

    from diskvault.archive import create as create_mod
    from diskvault.archive.create import CreateOptions, create_archive
    from diskvault.source.content import SeekableContent, StreamContent
    from diskvault.source.paths import Meta, Source
    from diskvault.storage.memory import MemoryStore

    calls = {"blocks": 0, "from_digests": 0}
    for name in calls:
        orig = getattr(create_mod.Fingerprinter, name)

        def counted(self, *a, _orig=orig, _name=name):
            calls[_name] += 1
            return _orig(self, *a)
        monkeypatch.setattr(create_mod.Fingerprinter, name, counted)
    from diskvault.repository import repo as repo_mod

    monkeypatch.setattr(repo_mod, "FORMAT_VERSION", version)
    repo = new_repo(MemoryStore(), "none")
    assert repo.format_version == version
    data = random.Random(21).randbytes(3 * MiB)
    # a stream: the default stream chunker is content-defined
    create_archive(repo, "s", [Source(Meta(path="s", size=len(data)),
                                      StreamContent(io.BytesIO(data).read, what="s"))],
                   CreateOptions())
    assert calls == {"blocks": 0, "from_digests": 0}
    img = tmp_path / "img"
    img.write_bytes(data)
    with open(img, "rb") as f:
        create_archive(repo, "f", [Source(Meta(path="f", size=len(data)),
                                          SeekableContent(f.fileno(), len(data), what="f"))],
                       CreateOptions())
    assert calls["blocks" if version == 2 else "from_digests"] > 0
    assert calls["from_digests" if version == 2 else "blocks"] == 0
