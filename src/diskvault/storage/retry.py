"""RetryStore: retry transient backend failures with exponential backoff and jitter.

Backends mark each StorageError they raise as transient (network, timeouts, 5xx,
a dropped SSH connection) or not (bad credentials, unknown host key, invalid name)
with ``storage_error(msg, transient)``; an unmarked StorageError counts as transient.
Never retried: ObjectMissing (an answer, not a failure), StorageFull (waiting does not
free space), RepositoryExists, and ``create`` as a whole (a retried create whose first
attempt got through would report the repository it just made as "already exists").

The budget is time, not attempts (the default of 30 attempts is never reached within
two minutes): a server restart, a failover or a flapping link of up to about a minute
is ridden out; ``DISKVAULT_RETRY_SECONDS`` sets the budget (0: no retries).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from ..errors import ObjectMissing, StorageError, StorageFull
from .base import Store, StoreWrapper

log = logging.getLogger(__name__)
T = TypeVar("T")


def storage_error(message: str, transient: bool) -> StorageError:
    """A one-line StorageError carrying the verdict ``is_transient`` reads."""
    err = StorageError(" ".join(message.split()))  # whatever the server sent, one line
    err.transient = transient  # type: ignore[attr-defined]
    return err


def is_transient(err: BaseException) -> bool:
    return (isinstance(err, StorageError) and not isinstance(err, StorageFull)
            and getattr(err, "transient", True))


class RetryStore(StoreWrapper):
    def __init__(
        self,
        inner: Store,
        *,
        attempts: int = 30,
        max_elapsed: float = 120.0,
        base_delay: float = 0.2,
        max_delay: float = 15.0,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(inner)
        self.attempts = attempts
        self.max_elapsed = max_elapsed
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._random = random.Random(seed)
        self._sleep = sleep
        self._clock = clock
        self._outage = False

    def _delay(self, failures: int) -> float:
        # "full jitter": writers that failed together do not come back together
        cap = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return self._random.uniform(cap / 2, cap)

    def _call(self, op: str, name: str, fn: Callable[[], T]) -> T:
        start = self._clock()
        failures = 0
        while True:
            try:
                result = fn()
                self._outage = False
                return result
            except StorageError as e:
                if not is_transient(e):
                    raise
                if not self._outage and self.max_elapsed > 0:
                    # once per outage, not per thread and attempt: the user learns why
                    # the backup stalls, and a long outage does not flood the terminal
                    self._outage = True
                    log.warning("storage: %s; retrying for up to %.0f s", e, self.max_elapsed)
                failures += 1
                delay = self._delay(failures)
                elapsed = self._clock() - start
                if failures >= self.attempts or elapsed + delay > self.max_elapsed:
                    log.debug("%s %s: giving up after %d attempts: %s", op, name, failures, e)
                    # final: a RetryStore around this one must not start over
                    raise storage_error(
                        f"{e} (gave up after {failures} attempts in {elapsed:.0f} s)", False
                    ) from None
                log.debug("%s %s: attempt %d failed (%s); retrying in %.2f s",
                          op, name, failures, e, delay)
                self._sleep(delay)

    def create(self) -> None:
        self.inner.create()

    def exists(self) -> bool:
        return self._call("exists", "", self.inner.exists)

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        return self._call("load", name, lambda: self.inner.load(name, offset, size))

    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        self._call("store", name, lambda: self.inner.store(name, value))

    def store_parts(self, name: str, parts: list[bytes | bytearray | memoryview]) -> None:
        self._call("store", name, lambda: self.inner.store_parts(name, parts))

    def delete(self, name: str) -> None:
        failed = False

        def attempt() -> None:
            nonlocal failed
            try:
                self.inner.delete(name)
            except ObjectMissing:
                if not failed:
                    raise
                # an earlier attempt got through and only its reply was lost
            except StorageError:
                failed = True
                raise

        self._call("delete", name, attempt)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        # collected before yielding: a retry restarting halfway would repeat names
        yield from self._call("list", prefix, lambda: list(self.inner.list(prefix)))

    def size(self, name: str) -> int:
        return self._call("size", name, lambda: self.inner.size(name))

