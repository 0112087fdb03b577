"""Repository locks: mutual exclusion from lock objects alone, writer preference, stale locks."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time

import pytest

from diskvault.errors import LockError
from diskvault.repository import lock as lockmod
from diskvault.repository.lock import EXCLUSIVE, SHARED, Lock, break_locks, read_locks
from diskvault.storage.memory import MemoryStore


class JitterStore(MemoryStore):
    """Random delays around every call, so that lock protocol steps interleave."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.created = True
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def _pause(self) -> None:
        with self._rng_lock:
            d = self._rng.random() * 0.002
        time.sleep(d)

    def store(self, name, value):
        self._pause()
        super().store(name, value)
        self._pause()

    def list(self, prefix):
        self._pause()
        items = list(super().list(prefix))
        self._pause()
        yield from items


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_exclusive_with_an_older_id_does_not_slip_past_a_held_shared_lock():
    # the id orders waiting exclusive locks only; it must never decide who holds
    store = MemoryStore()
    x = Lock(store, EXCLUSIVE, lock_wait=0)  # id taken now, acquired later
    time.sleep(0.001)
    s = Lock(store, SHARED).acquire()
    with pytest.raises(LockError, match="shared lock"):
        x.acquire()
    assert [r["kind"] for r in read_locks(store)] == [SHARED]  # x withdrew its object
    s.release()
    x.acquire().release()
    assert not list(store.list("locks"))


def test_waiting_exclusive_lock_keeps_new_shared_locks_out():
    store = MemoryStore()
    reader = Lock(store, SHARED).acquire()
    got = threading.Event()

    def pruner():
        with Lock(store, EXCLUSIVE, lock_wait=10):
            got.set()
            time.sleep(0.2)

    t = threading.Thread(target=pruner)
    t.start()
    deadline = time.monotonic() + 5
    while len(read_locks(store)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(LockError, match="exclusive lock"):  # a new backup waits its turn
        Lock(store, SHARED, lock_wait=0.3).acquire()
    assert not got.is_set()
    reader.release()
    assert got.wait(5)
    late = Lock(store, SHARED, lock_wait=10).acquire()  # gets in once the pruner is done
    t.join()
    late.release()


@pytest.mark.parametrize("seed", range(3))
def test_mutual_exclusion_under_interleaving(seed):
    store = JitterStore(seed)
    state = {"shared": 0, "exclusive": 0}
    guard = threading.Lock()
    violations: list[str] = []
    acquired = {SHARED: 0, EXCLUSIVE: 0}

    def worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        for _ in range(12):
            kind = EXCLUSIVE if rng.random() < 0.4 else SHARED
            try:
                lk = Lock(store, kind, lock_wait=20).acquire()
            except LockError:
                continue
            with guard:
                state[kind] += 1
                acquired[kind] += 1
                if state["exclusive"] > 1 or (state["exclusive"] and state["shared"]):
                    violations.append(str(state))
            time.sleep(rng.random() * 0.003)
            with guard:
                state[kind] -= 1
            lk.release()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not violations
    assert acquired[EXCLUSIVE] > 5 and acquired[SHARED] > 5
    assert not list(store.list("locks"))


def test_lock_of_a_dead_process_on_this_host_is_removed():
    store = MemoryStore()
    store.store("locks/0-dead", json.dumps({"kind": EXCLUSIVE, "host": socket.gethostname(),
                                            "pid": dead_pid(), "time": time.time(),
                                            "id": "0-dead"}).encode())
    with Lock(store, EXCLUSIVE, lock_wait=0):
        assert [r["name"] for r in read_locks(store)] != ["locks/0-dead"]
    assert not list(store.list("locks"))


def test_stale_lock_of_another_host_is_reported_and_broken():
    store = MemoryStore()
    old = time.time() - 2 * lockmod.STALE_AFTER
    store.store("locks/0-far", json.dumps({"kind": SHARED, "host": "elsewhere", "pid": 1,
                                           "time": old, "id": "0-far"}).encode())
    with pytest.raises(LockError, match="stale.*break-lock"):
        Lock(store, EXCLUSIVE, lock_wait=0).acquire()
    removed = break_locks(store)
    assert [r["host"] for r in removed] == ["elsewhere"]
    Lock(store, EXCLUSIVE, lock_wait=0).acquire().release()


def test_garbage_lock_objects_are_not_locks():
    store = MemoryStore()
    store.store("locks/junk", b"\xff not json")
    store.store("locks/list", b"[1, 2]")
    Lock(store, EXCLUSIVE, lock_wait=0).acquire().release()


def test_release_wins_against_a_heartbeat_in_flight(monkeypatch):
    class SlowStore(MemoryStore):
        def store(self, name, value):
            time.sleep(0.05)  # a heartbeat write that takes a while (S3, SFTP)
            super().store(name, value)

    monkeypatch.setattr(lockmod, "HEARTBEAT", 0.01)
    store = SlowStore()
    for _ in range(10):
        lk = Lock(store, SHARED).acquire()
        time.sleep(0.03)  # a heartbeat is probably storing right now
        lk.release()
        time.sleep(0.12)  # any heartbeat still running has finished
        assert not list(store.list("locks")), "a heartbeat re-created a released lock"
