"""FaultStore: a wrapper that injects failures into any Store, for tests.

Rules pick calls by operation and name (``fnmatch`` pattern) and fire a given number
of times, in the order they were added; damage is deterministic for a given seed::

    fs = FaultStore(MemoryStore(), seed=1)
    fs.fail("store", "packs/*", times=2)          # two transient StorageErrors
    fs.fail("load", "index/*", error=ObjectMissing("index/x"))
    fs.truncate("load", "packs/*", keep=0.5)      # half of the value comes back
    fs.flip_bits("load", "archives/*", bits=3)    # three flipped bits
    fs.full("store", after_bytes=1 << 20)         # ENOSPC once 1 MiB is stored

``calls`` records every ``(operation, name)`` that reached the wrapper.
"""

from __future__ import annotations

import fnmatch
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import StorageFull
from .base import Store, StoreWrapper
from .retry import storage_error

OPS = frozenset({"create", "exists", "load", "store", "delete", "list", "size"})


@dataclass
class _Rule:
    op: str
    pattern: str
    times: int | None  # None: forever
    raise_: BaseException | None = None
    damage: Callable[[bytes], bytes] | None = None
    room: int | None = None  # for "full": bytes that may still be stored

    def matches(self, op: str, name: str) -> bool:
        return (self.times is None or self.times > 0) and self.op in (op, "*") and \
            fnmatch.fnmatchcase(name, self.pattern)


class FaultStore(StoreWrapper):
    def __init__(self, inner: Store, seed: int = 0) -> None:
        super().__init__(inner)
        self.calls: list[tuple[str, str]] = []
        self._rules: list[_Rule] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stored_bytes = 0

    # --- configuring faults ------------------------------------------------------------

    def _add(self, rule: _Rule) -> FaultStore:
        if rule.op not in OPS and rule.op != "*":
            raise ValueError(f"unknown operation {rule.op!r}")
        with self._lock:
            self._rules.append(rule)
        return self

    def fail(self, op: str, pattern: str = "*", times: int | None = 1,
             error: BaseException | None = None) -> FaultStore:
        """Raise ``error`` (default: a transient StorageError) instead of calling through."""
        err = error or storage_error(f"injected {op} failure", transient=True)
        return self._add(_Rule(op, pattern, times, raise_=err))

    def truncate(self, op: str = "load", pattern: str = "*", times: int | None = 1,
                 keep: float = 0.5) -> FaultStore:
        """Return only the first ``keep`` fraction of a loaded value."""
        return self._add(_Rule(op, pattern, times, damage=lambda v: v[: int(len(v) * keep)]))

    def flip_bits(self, op: str = "load", pattern: str = "*", times: int | None = 1,
                  bits: int = 1) -> FaultStore:
        """Flip ``bits`` distinct bits, chosen by the seeded generator, in a loaded value."""
        def flip(v: bytes) -> bytes:
            if not v:
                return v
            out = bytearray(v)
            for pos in self._random.sample(range(len(v) * 8), min(bits, len(v) * 8)):
                out[pos // 8] ^= 1 << (pos % 8)
            return bytes(out)

        return self._add(_Rule(op, pattern, times, damage=flip))

    def full(self, op: str = "store", pattern: str = "*", after_bytes: int = 0) -> FaultStore:
        """Raise StorageFull for stores once ``after_bytes`` went through (like ENOSPC)."""
        if op != "store":
            raise ValueError("only stores can run out of space")
        return self._add(_Rule(op, pattern, None, raise_=StorageFull(self.location),
                               room=after_bytes))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    # --- the wrapper ---------------------------------------------------------------------

    def _fire(self, op: str, name: str, size: int = 0) -> _Rule | None:
        """Record the call; return the rule that applies to it (consuming one use)."""
        with self._lock:
            self.calls.append((op, name))
            for rule in self._rules:
                if not rule.matches(op, name):
                    continue
                if rule.room is not None and self._stored_bytes + size <= rule.room:
                    continue  # still fits
                if rule.times is not None:
                    rule.times -= 1
                if rule.raise_ is not None:
                    raise rule.raise_.with_traceback(None)  # one instance, raised anew
                return rule
            if op == "store":
                self._stored_bytes += size
        return None

    def create(self) -> None:
        self._fire("create", "")
        self.inner.create()

    def exists(self) -> bool:
        self._fire("exists", "")
        return self.inner.exists()

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        rule = self._fire("load", name)
        value = self.inner.load(name, offset, size)
        if rule is not None and rule.damage is not None:
            with self._lock:  # the seeded generator must not be shared mid-draw
                value = rule.damage(value)
        return value

    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        self._fire("store", name, len(memoryview(value)))
        self.inner.store(name, value)

    def delete(self, name: str) -> None:
        self._fire("delete", name)
        self.inner.delete(name)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        self._fire("list", prefix)
        yield from self.inner.list(prefix)

    def size(self, name: str) -> int:
        self._fire("size", name)
        return self.inner.size(name)

