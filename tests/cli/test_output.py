"""cli/output.py: sizes, and Borg's figures for archives made before they were recorded."""

from __future__ import annotations

import random

import pytest
from support import dv, init_repo

from diskvault.archive.view import ArchiveView
from diskvault.cli.common import open_repo
from diskvault.cli.output import archive_stats_json, cache_json, fmt_size


@pytest.mark.parametrize(("n", "binary", "text"), [
    (0, False, "0 B"), (999, False, "999 B"), (1000, False, "1.00 kB"),
    (3_210_000, False, "3.21 MB"), (2 * 10**18, False, "2000.00 PB"),
    (1023, True, "1023 B"), (1024, True, "1.0 KiB"), (3 << 19, True, "1.5 MiB"),
])
def test_sizes(n, binary, text):
    assert fmt_size(n, binary=binary) == text


def _without_new_figures(meta: dict) -> dict:
    stats = {k: v for k, v in meta["stats"].items() if k not in ("chunks", "compressed")}
    return {**meta, "stats": stats}


def test_older_archives_are_counted_from_their_items(tmp_path, monkeypatch):
    repo_path = str(tmp_path / "repo")
    init_repo(repo_path, "none", "--pack-size", "1MiB")
    data = tmp_path / "data"
    data.mkdir()
    block = random.Random(3).randbytes(1 << 20)
    (data / "a").write_bytes(block * 3)  # one chunk stored, referenced three times
    (data / "b").write_bytes(bytes(1 << 20) + block[:1000])  # zeros are no chunk
    for name in ("one", "two"):
        dv("create", "--chunker-params", "fixed,1048576", f"{repo_path}::{name}", str(data))
    with open_repo(repo_path) as repo:
        recorded = cache_json(repo)
        view = ArchiveView.open(repo, "one")
        new = archive_stats_json(repo, view.meta, lambda: [])
        assert new["chunks"] == 4 and recorded["stats"]["total_chunks"] == 8
        assert recorded["stats"]["total_size"] == 2 * (3 * (1 << 20) + 1000)
        load = repo.load_archive
        monkeypatch.setattr(repo, "load_archive", lambda ref: _without_new_figures(load(ref)))
        assert cache_json(repo) == recorded
        old = archive_stats_json(repo, _without_new_figures(view.meta), lambda: view.items)
        assert old["compressed_size"] == new["compressed_size"] > 3 * (1 << 20) + 1000
