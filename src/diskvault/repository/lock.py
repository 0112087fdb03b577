"""Repository locks as storage objects: work on local disks, SFTP and object stores alike.

A lock is a value ``locks/<id>`` holding JSON {kind, host, pid, time, id}. Acquiring:
write our lock, list all locks, and keep it only if no conflicting lock exists
(shared conflicts with exclusive; exclusive with everything) that was there first
(ordered by time, then id). Otherwise delete ours and retry until ``lock_wait``.
Stale locks: same host and the pid is gone, or the heartbeat is older than
``STALE_AFTER`` (holders refresh their lock every ``HEARTBEAT`` seconds).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from ..errors import LockError, ObjectMissing
from ..storage.base import Store

SHARED, EXCLUSIVE = "shared", "exclusive"
HEARTBEAT = 60.0
STALE_AFTER = 30 * 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    def __init__(self, store: Store, kind: str, lock_wait: float = 1.0,
                 namespace: str = "locks") -> None:
        self.store = store
        self.kind = kind
        self.lock_wait = lock_wait
        self.namespace = namespace
        self.host = socket.gethostname()
        self.id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        self.name = f"{namespace}/{self.id}"
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"kind": self.kind, "host": self.host, "pid": os.getpid(),
                           "time": time.time(), "id": self.id}).encode()

    def _others(self) -> list[dict]:
        out = []
        for name, _ in self.store.list(self.namespace):
            if name == self.name:
                continue
            try:
                rec = json.loads(self.store.load(name))
            except (ObjectMissing, ValueError):
                continue
            rec["name"] = name
            out.append(rec)
        return out

    def is_stale(self, rec: dict) -> bool:
        if rec.get("host") == self.host and not _pid_alive(int(rec.get("pid", 0))):
            return True
        return time.time() - float(rec.get("time", 0)) > STALE_AFTER

    def acquire(self) -> Lock:
        deadline = time.monotonic() + self.lock_wait
        while True:
            self.store.store(self.name, self._record())
            blockers = []
            for rec in self._others():
                if self.is_stale(rec):
                    try:  # a crashed process on this host: its lock can go
                        if rec.get("host") == self.host:
                            self.store.delete(rec["name"])
                            continue
                    except ObjectMissing:
                        continue
                if self.kind == SHARED and rec.get("kind") == SHARED:
                    continue
                # of two conflicting new locks the older one wins; the other retries
                if self.kind == SHARED or str(rec.get("id", "")) < self.id \
                        or rec.get("kind") == EXCLUSIVE:
                    blockers.append(rec)
            if not blockers:
                break
            try:
                self.store.delete(self.name)
            except ObjectMissing:
                pass
            if time.monotonic() >= deadline:
                b = blockers[0]
                raise LockError(
                    f"repository is locked ({b.get('kind')} lock by pid {b.get('pid')} on "
                    f"{b.get('host')}); wait, use --lock-wait, or 'break-lock' if it is stale"
                )
            time.sleep(min(0.2 + 0.3 * (os.getpid() % 3), max(0.0, deadline - time.monotonic())))
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self.store.store(self.name, self._record())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried next time
                pass

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        self._held = False
        try:
            self.store.delete(self.name)
        except ObjectMissing:
            pass

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def break_locks(store: Store) -> int:
    n = 0
    for ns in ("locks", "locks-manifest"):
        for name, _ in list(store.list(ns)):
            try:
                store.delete(name)
                n += 1
            except ObjectMissing:
                pass
    return n
