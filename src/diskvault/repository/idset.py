"""A compact set of 32-byte ids: appended as bytes, then sorted once and searched.

``compact`` must know every chunk any archive references: millions of ids for a
multi-TiB repository. As Python ``bytes`` in a ``set`` that is ~100 bytes per id; here it
is 32 (a sorted numpy array of ``V32``), and membership is a binary search.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ID_LEN = 32
_V = np.dtype((np.void, ID_LEN))


class IdSet:
    def __init__(self, ids: Iterable[bytes] = ()) -> None:
        self._buf = bytearray()
        self._sorted = np.zeros(0, dtype=_V)
        for i in ids:
            self.add(i)

    def add(self, chunk_id: bytes) -> None:
        self._buf += chunk_id
        if len(self._buf) >= 32 << 20:  # bound the unsorted tail (1 M ids)
            self._fold()

    def _fold(self) -> None:
        if self._buf:
            new = np.frombuffer(bytes(self._buf), dtype=_V)
            self._sorted = np.unique(np.concatenate([self._sorted, new]))
            self._buf = bytearray()

    def __contains__(self, chunk_id: bytes) -> bool:
        self._fold()
        if len(chunk_id) != ID_LEN or not len(self._sorted):
            return False
        key = np.frombuffer(chunk_id, dtype=_V)[0]
        i = int(np.searchsorted(self._sorted, key))
        return i < len(self._sorted) and self._sorted[i] == key

    def contains_many(self, ids: bytes) -> np.ndarray:
        """Membership of each id in ``ids`` (concatenated), as one vectorised search."""
        self._fold()
        keys = np.frombuffer(ids, dtype=_V)
        if not len(self._sorted) or not len(keys):
            return np.zeros(len(keys), dtype=bool)
        i = np.searchsorted(self._sorted, keys)
        i[i == len(self._sorted)] = 0
        return self._sorted[i] == keys

    def __len__(self) -> int:
        self._fold()
        return len(self._sorted)

    def __iter__(self):
        self._fold()
        return (v.tobytes() for v in self._sorted)
