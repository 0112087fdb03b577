"""Concurrent uploads: how many packs go up at once, through every wrapper."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest

from diskvault.archive.create import CreateOptions, create_archive
from diskvault.chunking.base import ChunkerParams
from diskvault.repository.repo import Repository
from diskvault.source.content import StreamContent
from diskvault.source.paths import Meta, Source
from diskvault.storage.faults import FaultStore
from diskvault.storage.memory import MemoryStore
from diskvault.storage.retry import RetryStore
from diskvault.storage.url import open_store


class SlowStore(MemoryStore):
    """Pack stores take a while, like a PUT over a network; records the peak overlap."""

    remote = True
    upload_concurrency = 5

    def __init__(self) -> None:
        super().__init__()
        self.running = self.peak = 0
        self.reserved: list[int] = []
        self._count = threading.Lock()

    def reserve_connections(self, n: int) -> None:
        self.reserved.append(n)

    def store(self, name, value):
        if not name.startswith("packs/"):
            return super().store(name, value)
        with self._count:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.05)
            super().store(name, value)
        finally:
            with self._count:
                self.running -= 1


def backup(store, upload_threads: int | None) -> None:
    repo = Repository.init(store, "none", lambda _c: "", pack_size=256 << 10)
    data = io.BytesIO(os.urandom(4 << 20))
    src = Source(Meta(path="disk"), StreamContent(data.read, what="disk"))
    opts = CreateOptions(upload_threads=upload_threads, chunker=ChunkerParams.parse("fixed,65536"))
    create_archive(repo, "a", [src], opts)  # 64 chunks, 16 packs: more than any pool
    repo.close()


@pytest.mark.parametrize(("asked", "peak"), [(None, 5), (2, 2), (7, 7)])
def test_packs_go_up_as_many_at_once_as_asked_or_as_the_store_suits(asked, peak) -> None:
    slow = SlowStore()
    backup(RetryStore(FaultStore(slow)), asked)  # both wrappers pass everything through
    assert slow.peak == peak
    assert slow.reserved == [peak]  # the pool was sized for the uploads


def test_remote_stores_choose_their_upload_concurrency(tmp_path) -> None:
    s3 = open_store("s3:k:s@http://127.0.0.1:9/bucket/repo")
    sftp = open_store("sftp://u@127.0.0.1:9/srv/repo")
    local = open_store(str(tmp_path / "repo"))
    assert isinstance(s3, RetryStore) and isinstance(sftp, RetryStore)
    assert (s3.upload_concurrency, sftp.upload_concurrency, local.upload_concurrency) == (4, 4, 1)
    assert s3.remote and sftp.remote and not local.remote
    # asked for more, they make room: S3 grows its pool, SFTP up to OpenSSH's MaxSessions
    s3.reserve_connections(20)
    assert s3.inner._max_connections == 24  # type: ignore[attr-defined]
    sftp.reserve_connections(20)
    assert sftp.inner.connections == 10  # type: ignore[attr-defined]


def test_retry_budget_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DISKVAULT_RETRY_SECONDS", "7.5")
    store = open_store("s3:k:s@http://127.0.0.1:9/bucket/repo")
    assert isinstance(store, RetryStore) and store.max_elapsed == 7.5
    monkeypatch.setenv("DISKVAULT_RETRY_SECONDS", "soon")
    with pytest.raises(Exception, match="DISKVAULT_RETRY_SECONDS"):
        open_store("s3:k:s@http://127.0.0.1:9/bucket/repo")
