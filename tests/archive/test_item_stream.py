"""The item stream is decoded chunk by chunk in bounded memory, whatever chunk list an
archive names (one huge chunk forty times made `list` join it all before)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable

import pytest
from support import dv, init_repo

from diskvault.archive import items as items_mod
from diskvault.archive.check import read_items_robust
from diskvault.archive.items import read_item_stream, write_item_stream
from diskvault.archive.model import Extents, Item
from diskvault.archive.view import ArchiveView
from diskvault.errors import IntegrityError
from diskvault.repository.repo import Repository
from diskvault.source.content import DATA
from diskvault.storage.local import LocalStore

MIB = 1 << 20


def _items(n: int) -> list[Item]:
    out = []
    for i in range(n):
        ext = Extents()
        ext.append(DATA, 4096, bytes([i % 256]) * 32)
        out.append(Item(path=f"dir/file{i:05d}", size=4096, extents=ext, mtime=i))
    return out


def _mem_store() -> tuple[dict[bytes, bytes], Callable[[bytes], bytes]]:
    store: dict[bytes, bytes] = {}

    def put(data: bytes) -> bytes:
        cid = os.urandom(32)
        store[cid] = data
        return cid

    return store, put


def test_roundtrip_across_many_chunks():
    store, put = _mem_store()
    items = _items(20000)
    ids = write_item_stream(items, put)
    assert len(ids) > 3
    back = list(read_item_stream(ids, store.__getitem__))
    assert [i.path for i in back] == [i.path for i in items]
    assert bytes(back[-1].extents) == bytes(items[-1].extents)


def test_truncated_stream_is_an_error():
    store, put = _mem_store()
    ids = write_item_stream(_items(100), put)
    cid = ids[-1]
    store[cid] = store[cid][:-3]
    with pytest.raises(IntegrityError, match="truncated"):
        list(read_item_stream(ids, store.__getitem__))


def test_item_larger_than_the_cap_is_refused(monkeypatch):
    monkeypatch.setattr(items_mod, "MAX_ITEM_META", 2 * MIB)
    big = Item(path="big", size=0, extents=Extents(bytes(3 * MIB)))
    store, put = _mem_store()
    ids = write_item_stream([big], put)
    with pytest.raises(IntegrityError, match="exceeds 2 MiB"):
        list(read_item_stream(ids, store.__getitem__))


def _peak_rss(args: list[str]) -> tuple[int, bytes, int]:
    """Run the CLI; return (exit code, stderr, peak RSS in bytes) of that process alone."""
    with open(os.devnull, "wb") as null:
        p = subprocess.Popen([sys.executable, "-m", "diskvault", *args], stdout=null,
                             stderr=subprocess.PIPE)
        err = p.stderr.read() if p.stderr else b""
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, err, ru.ru_maxrss * 1024


def test_item_list_naming_one_big_chunk_forty_times_runs_in_bounded_memory(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    src = tmp_path / "big"
    src.write_bytes(random.Random(8).randbytes(32 * MIB))
    dv("create", "-C", "none", "--chunker-params", f"fixed,{32 * MIB}", f"{repo}::src",
       str(src), env=env)
    with Repository.open(LocalStore(repo), lambda _c: "") as r:
        item = next(i for i in ArchiveView.open(r, "src").items if i.path.endswith("big"))
        assert item.extents is not None
        (cid,) = [c for k, _, c in item.extents if k == DATA]
        meta = dict(r.load_archive(r.archive_ref("src")))
        meta["items"] = [cid] * 40  # 1.25 GiB if joined
        r.commit_archive("evil", meta, None)
    code, err, peak = _peak_rss(["list", f"{repo}::evil"])
    assert code == 2, err
    assert err.decode().count("\n") == 1 and "item" in err.decode(), err
    # bounded by the 256 MiB cap on one item's metadata plus a chunk or two in flight
    # (measured 117–439 MiB, depending on threads); main before the fix: 2.6 GB
    assert peak < 640 * MIB, f"list used {peak >> 20} MiB"


def test_check_reads_around_an_item_list_of_one_huge_chunk_in_bounded_memory():
    """check's robust reader joins runs of chunks: chunks larger than any writer cuts
    are refused first, so forty names of one 32 MiB chunk do not become 1.25 GiB."""
    # measured in a fresh process: tracemalloc counts every thread's allocations, and
    # threads left by earlier tests in this one would count too
    code = ("import json, random, tracemalloc\n"
            "from diskvault.archive.check import read_items_robust\n"
            "huge = random.Random(9).randbytes(32 << 20)\n"
            "tracemalloc.start()\n"
            "items, lost = read_items_robust([b'\\1' * 32] * 40, lambda _cid: huge)\n"
            "print(json.dumps([len(items), len(lost), tracemalloc.get_traced_memory()[1],"
            " lost[0][1] if lost else '']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    n_items, n_lost, peak, why = json.loads(r.stdout)
    assert n_items == 0 and n_lost == 40 and "more than any item metadata" in why
    assert peak < 8 * MIB, f"{peak >> 20} MiB"
    # a real stream still reads whole
    store, put = _mem_store()
    ids = write_item_stream(_items(3000), put)
    items, lost = read_items_robust(ids, store.__getitem__)
    assert len(items) == 3000 and lost == []
