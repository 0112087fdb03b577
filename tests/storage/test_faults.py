"""RetryStore against injected and real failures; FaultStore itself; running out of space."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskvault.errors import ObjectMissing, StorageError, StorageFull
from diskvault.storage.base import Store
from diskvault.storage.faults import FaultStore
from diskvault.storage.local import LocalStore
from diskvault.storage.memory import MemoryStore
from diskvault.storage.retry import RetryStore, is_transient, storage_error
from diskvault.storage.url import open_store

MiB = 1 << 20


class Sleeps:
    """Records the delays RetryStore asks for and advances a fake clock by them."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.now = 0.0

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def retrying(inner: Store, **kw: object) -> tuple[RetryStore, Sleeps]:
    sleeps = Sleeps()
    return RetryStore(inner, sleep=sleeps, clock=sleeps.clock, seed=1, **kw), sleeps  # type: ignore[arg-type]


# --- RetryStore -----------------------------------------------------------------------


def test_recovers_from_fail_once(caplog: pytest.LogCaptureFixture) -> None:
    faults = FaultStore(MemoryStore()).fail("store", "packs/*", times=1)
    store, sleeps = retrying(faults, base_delay=0.5)
    with caplog.at_level(logging.DEBUG, logger="diskvault.storage.retry"):
        store.store("packs/ab/1", b"data")
        store.store("index/1", b"idx")  # pattern did not match: no fault, no retry
    assert store.load("packs/ab/1") == b"data"
    assert faults.calls.count(("store", "packs/ab/1")) == 2
    assert faults.calls.count(("store", "index/1")) == 1
    assert len(sleeps.delays) == 1 and 0.25 <= sleeps.delays[0] <= 0.5
    assert "attempt 1 failed" in caplog.text and "packs/ab/1" in caplog.text


def test_gives_up_after_n_attempts() -> None:
    faults = FaultStore(MemoryStore()).fail("load", times=None)
    faults.inner.store("x", b"1")
    store, sleeps = retrying(faults, attempts=4, base_delay=0.1, max_delay=0.3)
    with pytest.raises(StorageError, match="gave up after 4 attempts") as e:
        store.load("x")
    assert faults.calls.count(("load", "x")) == 4
    assert len(sleeps.delays) == 3
    # exponential, jittered into [cap/2, cap], capped at max_delay
    for k, d in enumerate(sleeps.delays, start=1):
        cap = min(0.3, 0.1 * 2 ** (k - 1))
        assert cap / 2 <= d <= cap
    assert not is_transient(e.value)  # an outer RetryStore must not start over
    assert "\n" not in str(e.value)


def test_bounded_by_elapsed_time() -> None:
    faults = FaultStore(MemoryStore()).fail("list", times=None)
    store, sleeps = retrying(faults, attempts=1000, max_elapsed=10.0, base_delay=1.0,
                             max_delay=4.0)
    with pytest.raises(StorageError, match="gave up"):
        list(store.list(""))
    assert sum(sleeps.delays) <= 10.0
    assert len(sleeps.delays) >= 3  # it did try for a while


@pytest.mark.parametrize(
    "error",
    [ObjectMissing("packs/x"), StorageFull("somewhere"),
     storage_error("access denied", transient=False)],
    ids=["missing", "full", "permanent"],
)
def test_does_not_retry_final_answers(error: Exception) -> None:
    faults = FaultStore(MemoryStore()).fail("load", times=None, error=error)
    store, sleeps = retrying(faults)
    with pytest.raises(type(error)):
        store.load("packs/x")
    assert faults.calls == [("load", "packs/x")]
    assert sleeps.delays == []


def test_missing_is_not_retried_without_faults() -> None:
    faults = FaultStore(MemoryStore())
    store, sleeps = retrying(faults)
    with pytest.raises(ObjectMissing):
        store.load("nope")
    assert faults.calls == [("load", "nope")] and sleeps.delays == []


class _LostReply(FaultStore):
    """Deletes for real, then reports a transient failure once: the reply was lost."""

    def delete(self, name: str) -> None:
        first = not any(op == "delete" for op, _ in self.calls)
        super().delete(name)
        if first:
            raise storage_error("connection reset", transient=True)


def test_delete_whose_reply_was_lost_succeeds() -> None:
    inner = _LostReply(MemoryStore())
    inner.inner.store("locks/me", b"1")
    store, _ = retrying(inner)
    store.delete("locks/me")  # the retry finds it gone: that is success
    with pytest.raises(ObjectMissing):
        store.delete("locks/me")  # but a delete of a missing name still says so


def test_list_retry_does_not_repeat_names() -> None:
    mem = MemoryStore()
    for i in range(5):
        mem.store(f"packs/{i}", b"x")
    store, _ = retrying(FaultStore(mem).fail("list", times=2))
    assert sorted(store.list("packs")) == [(f"packs/{i}", 1) for i in range(5)]


# --- FaultStore -----------------------------------------------------------------------


def test_fault_store_damage_is_deterministic() -> None:
    value = bytes(range(256)) * 64

    def damaged(seed: int) -> bytes:
        fs = FaultStore(MemoryStore(), seed=seed).flip_bits("load", "packs/*", bits=3)
        fs.store("packs/a", value)
        out = fs.load("packs/a")
        assert fs.load("packs/a") == value  # times=1: the second load is clean
        return out

    a, b, c = damaged(5), damaged(5), damaged(6)
    assert a == b and a != c
    diff = sum(bin(x ^ y).count("1") for x, y in zip(a, value, strict=True))
    assert diff == 3 and len(a) == len(value)


def test_fault_store_truncates_and_fails_by_name() -> None:
    fs = FaultStore(MemoryStore()).truncate("load", "index/*", times=None, keep=0.25)
    fs.fail("delete", "locks/theirs", times=2)
    fs.store("index/1", b"x" * 100)
    fs.store("locks/theirs", b"1")
    assert fs.load("index/1") == b"x" * 25
    assert fs.load("index/1", 10, 40) == b"x" * 10  # damage applies to what was loaded
    for _ in range(2):
        with pytest.raises(StorageError, match="injected delete"):
            fs.delete("locks/theirs")
    fs.delete("locks/theirs")
    with pytest.raises(ValueError):
        fs.fail("frobnicate")


def test_fault_store_runs_out_of_space() -> None:
    fs = FaultStore(MemoryStore()).full(after_bytes=3 * MiB)
    fs.store("packs/1", bytes(2 * MiB))
    with pytest.raises(StorageFull):
        fs.store("packs/2", bytes(2 * MiB))
    fs.store("small", bytes(MiB))  # what still fits still goes
    assert sorted(n for n, _ in fs.list("")) == ["packs/1", "small"]


# --- real servers dying mid-sequence --------------------------------------------------


def _stores_survive_restart(server, store: RetryStore, recorder: FaultStore, n: int) -> None:
    values = {f"packs/{i:02x}/v": os.urandom(256 * 1024) for i in range(n)}
    restarted = threading.Event()
    errors: list[BaseException] = []

    def restart_later() -> None:
        try:
            time.sleep(0.5)  # let stores fail against a dead server for a while
            server.start()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            restarted.set()

    t = None
    try:
        for i, (name, value) in enumerate(values.items()):
            if i == n // 3:
                server.kill()
                t = threading.Thread(target=restart_later)
                t.start()
            store.store(name, value)
    finally:
        if t is not None:
            t.join()
        if not server.running:
            server.start()  # leave the session server usable for the other tests
    assert not errors, errors
    for name, value in values.items():
        assert store.load(name) == value
    # more calls than stores+loads reached the backend: failures were retried
    assert len(recorder.calls) > 2 * n


@pytest.mark.timeout(120)
def test_retry_survives_seaweedfs_kill_and_restart(s3_server) -> None:
    bare = open_store(s3_server.url(f"restart-{uuid.uuid4().hex[:8]}"), retry=False)
    recorder = FaultStore(bare)  # no faults: counts the calls that reached the backend
    store = RetryStore(recorder, base_delay=0.2, max_delay=2.0, attempts=50, max_elapsed=90)
    store.create()
    _stores_survive_restart(s3_server, store, recorder, n=9)
    store.close()


@pytest.mark.timeout(60)
def test_retry_survives_sshd_kill_and_restart(sftp_server, tmp_path: Path) -> None:
    sftp_server.configure_client(Path(os.environ["HOME"]))
    recorder = FaultStore(open_store(sftp_server.url(str(tmp_path / "repo")), retry=False))
    store = RetryStore(recorder, base_delay=0.1, max_delay=1.0, attempts=30, max_elapsed=40)
    store.create()
    _stores_survive_restart(sftp_server, store, recorder, n=9)
    store.close()


# --- a real full filesystem -----------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_local_store_full_filesystem(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "mnt") as mnt:
        store = LocalStore(str(mnt / "repo"))
        store.create()
        store.store("config", b"fits")
        with pytest.raises(StorageFull, match="no space left"):
            store.store("packs/00/big", os.urandom(3 * MiB))
        assert dict(store.list("")) == {"config": 4}
        assert os.listdir(mnt / "repo" / "packs" / "00") == []  # the temp file was removed


def test_sftp_store_full_filesystem(tmp_path: Path, sftp_server) -> None:
    sftp_server.configure_client(Path(os.environ["HOME"]))
    with tiny_tmpfs(tmp_path / "mnt") as mnt:
        store = open_store(sftp_server.url(str(mnt / "repo")), retry=False)
        store.create()
        store.store("config", b"fits")
        with pytest.raises(StorageFull, match="no space left"):
            store.store("packs/00/big", os.urandom(3 * MiB))
        assert dict(store.list("")) == {"config": 4}
        assert os.listdir(mnt / "repo" / "packs" / "00") == []
        store.close()
