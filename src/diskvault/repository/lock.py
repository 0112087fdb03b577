"""Repository locks as storage objects: work on local disks, SFTP and object stores alike.

A lock is a value ``<namespace>/<id>`` holding JSON {kind, host, pid, time, id}; shared
locks conflict only with exclusive ones, exclusive locks with every other lock.

Only two storage guarantees are used (storage/base.py): a store is atomic, and a listing
shows every value stored before the listing began. From them follows the one rule that
makes locking safe:

    a lock is held only if a listing begun after the lock was stored showed no
    conflicting lock.

Of two conflicting locks A and B, if A's listing missed B then B was stored after that
listing began, so B's own listing (after B was stored) sees A: at most one can hold.
No rename, flock or conditional write is needed.

Everything else is liveness. A waiting exclusive lock stays in place, so new shared
locks (which always step back) cannot starve it (writer preference); of two waiting
exclusive locks the younger steps back. Stale locks: made on this machine by a process
that is gone (removed automatically), or no heartbeat for ``STALE_AFTER`` (reported;
``break-lock``).

"This machine" is more than the host name (storage/node.py): records carry the machine
id, the boot id and the pid namespace; a pid is only judged where all three match (a
different boot id of the same machine id means a reboot: that holder is gone).
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid

from ..errors import LockError, ObjectMissing
from ..storage.base import Store
from ..storage.node import node_identity, pid_alive

SHARED, EXCLUSIVE = "shared", "exclusive"
NAMESPACES = ("locks", "locks-manifest")
HEARTBEAT = 60.0
STALE_AFTER = 30 * 60.0
MAX_RETRY_DELAY = 2.0


def read_locks(store: Store, namespace: str = "locks") -> list[dict]:
    """Every readable lock record under ``namespace`` (with its storage ``name``)."""
    out = []
    for name, _ in list(store.list(namespace)):
        try:
            rec = json.loads(store.load(name))
        except (ObjectMissing, ValueError):
            continue  # released meanwhile, or not a lock record: never a blocker
        if isinstance(rec, dict):
            rec["name"] = name
            out.append(rec)
    return out


class Lock:
    def __init__(self, store: Store, kind: str, lock_wait: float = 1.0,
                 namespace: str = "locks") -> None:
        self.store = store
        self.kind = kind
        self.lock_wait = lock_wait
        self.namespace = namespace
        self.host = socket.gethostname()
        self.node = node_identity()
        self.id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        self.name = f"{namespace}/{self.id}"
        self._held = False
        self._stop = threading.Event()
        # serialises heartbeat writes with release, so no heartbeat re-creates a released lock
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"kind": self.kind, "host": self.host, "pid": os.getpid(),
                           "time": time.time(), "id": self.id, **self.node}).encode()

    def same_machine(self, rec: dict) -> bool:
        """Made on this machine (records without a machine id: by host name alone)."""
        if rec.get("host") != self.host:
            return False
        return "machine" not in rec or rec["machine"] == self.node["machine"]

    def _holder_gone(self, rec: dict, pid: int) -> bool:
        if not self.same_machine(rec):
            return False  # another machine: its pids cannot be judged from here
        if "boot" in rec:
            if rec["boot"] != self.node["boot"]:
                # rebooted since — unless there is no machine id to say it is this machine
                return bool(self.node["machine"]) and bool(rec.get("boot"))
            if rec.get("pidns") != self.node["pidns"]:
                return False  # another container on this kernel: other pids
        return not pid_alive(pid)

    def is_stale(self, rec: dict) -> bool:
        try:
            pid, beat = int(rec.get("pid", 0)), float(rec.get("time", 0))
        except (TypeError, ValueError):
            return True
        if self._holder_gone(rec, pid):
            return True
        return time.time() - beat > STALE_AFTER

    def _conflicts(self) -> list[dict]:
        blockers = []
        for rec in read_locks(self.store, self.namespace):
            if rec["name"] == self.name:
                continue
            if self.same_machine(rec) and self.is_stale(rec):
                try:  # a crashed process of this machine: its lock can go
                    self.store.delete(rec["name"])
                except ObjectMissing:
                    pass
                continue
            if self.kind == SHARED and rec.get("kind") == SHARED:
                continue
            blockers.append(rec)
        return blockers

    def acquire(self) -> Lock:
        deadline = time.monotonic() + self.lock_wait
        delay = 0.05
        while True:
            # (re)written every round: also the heartbeat of a lock that is waiting
            self.store.store(self.name, self._record())
            blockers = self._conflicts()
            if not blockers:
                break
            step_back = self.kind == SHARED or any(
                b.get("kind") != SHARED and str(b.get("id", "")) < self.id for b in blockers)
            timed_out = time.monotonic() >= deadline
            if step_back or timed_out:
                self._delete()
            if timed_out:
                raise LockError(self._message(blockers[0]))
            pause = delay * random.uniform(0.5, 1.5)  # jitter: contenders drift apart
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            delay = min(delay * 1.5, MAX_RETRY_DELAY)
        self._held = True
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name=f"lock-heartbeat-{self.id}")
        self._thread.start()
        return self

    def _message(self, b: dict) -> str:
        what = f"{b.get('kind')} lock by pid {b.get('pid')} on {b.get('host')}"
        if self.is_stale(b):
            age = (time.time() - float(b.get("time", 0) or 0)) / 60
            return (f"repository is locked ({what}, stale: no heartbeat for {age:.0f} min); "
                    "if that process is gone, run 'diskvault break-lock REPO'")
        return (f"repository is locked ({what}); wait, use --lock-wait, or 'break-lock' "
                "if it is stale")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    self.store.store(self.name, self._record())
                except Exception:  # noqa: BLE001 - a missed heartbeat is retried next time
                    pass

    def _delete(self) -> None:
        try:
            self.store.delete(self.name)
        except ObjectMissing:
            pass

    def release(self) -> None:
        with self._mutex:
            self._stop.set()
            held, self._held = self._held, False
        if held:
            self._delete()

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def break_locks(store: Store) -> list[dict]:
    """Remove every lock (the user says their holders are gone); return what was removed."""
    removed = []
    for ns in NAMESPACES:
        for name, _ in list(store.list(ns)):
            try:
                rec = json.loads(store.load(name))
            except (ObjectMissing, ValueError):
                rec = {}
            try:
                store.delete(name)
            except ObjectMissing:
                continue
            removed.append({**(rec if isinstance(rec, dict) else {}), "name": name})
    return removed
