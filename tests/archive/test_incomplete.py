"""An archive that lost items, or an item whose extents do not cover its size, is never
restored as if it were whole (in-process; the CLI cases are in cli/test_bit_rot.py)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from faults.faultkit import CHUNK, backup, new_repo

from diskvault.archive.extract import iter_pieces
from diskvault.archive.view import ArchiveView, describe_loss
from diskvault.errors import ArchiveIncomplete, IntegrityError
from diskvault.repository.manifest import ArchiveRef
from diskvault.storage.memory import MemoryStore


@pytest.fixture
def repo():
    r = new_repo(MemoryStore())
    rng = random.Random(5)
    backup(r, "one", {"x.img": rng.randbytes(3 * CHUNK + 100), "y.img": rng.randbytes(CHUNK)})
    yield r
    r.close()


def _with_meta(repo, change) -> ArchiveView:
    """Archive "one" with its metadata changed (stored and named like a repair does)."""
    meta = repo.load_archive(repo.archive_ref("one"))
    change(meta)
    repo.manifest.archives["one"] = ArchiveRef("one", repo.store_archive_meta(meta), 0.0)
    return ArchiveView.open(repo, "one")


def test_a_whole_archive_has_no_loss(repo):
    view = ArchiveView.open(repo, "one")
    assert view.loss is None and view.require_complete(False) is None
    assert len(view.items) == 2


def test_an_archive_a_repair_took_items_from_is_refused_unless_asked(repo):
    def lose_one(meta: dict) -> None:  # what _repair_meta records
        meta["repaired"] = [{"time": 1.0, "lost_item_chunks": 1, "items_before": 2,
                             "items_after": 1}]

    view = _with_meta(repo, lose_one)
    with pytest.raises(ArchiveIncomplete, match=r"lost 1 chunk\(s\) of its item metadata "
                       r"\(2 item\(s\) before, 1 after\).*--continue-on-error"):
        view.require_complete(False)
    assert "archive 'one' is incomplete" in (view.require_complete(True) or "")


@pytest.mark.parametrize("repaired", ["x", [1], [{}], {"lost_item_chunks": "?"}])
def test_a_malformed_repair_record_still_counts_as_a_loss(repaired):
    assert "is incomplete" in (describe_loss("one", repaired) or "")


@pytest.mark.parametrize("nitems", [1, 3])
def test_an_item_count_the_stream_does_not_hold_is_an_integrity_error(repo, nitems):
    view = _with_meta(repo, lambda m: m.update(nitems=nitems))
    with pytest.raises(IntegrityError, match=f"holds 2 item.*records {nitems}"):
        _ = view.items


@pytest.mark.parametrize("delta", [-1, 1])
def test_extents_not_covering_the_size_stop_the_restore(repo, delta):
    item = next(i for i in ArchiveView.open(repo, "one").items if i.path == "x.img")
    bad = replace(item, size=item.size + delta)
    with pytest.raises(IntegrityError, match="extents cover"):
        for _ in iter_pieces(repo, [bad]):
            pass
    assert sum(p.length for p in iter_pieces(repo, [item])) == item.size
