"""The chunk index: chunk id → (pack, offset, length, plain size), kept compact.

Memory: a sorted numpy table of 56 bytes per chunk (32-byte id, 8-byte sort prefix,
pack number, offset, length, plain size), plus a dict for entries added since the
last merge (merged every ``MERGE_AT`` additions). A 16 TiB device in 4 MiB chunks
is 4 M chunks ≈ 230 MiB; at the default sizes of a few TiB it is tens of MiB.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgpack
import numpy as np

from ..errors import IntegrityError

VAL = np.dtype([("pack", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("plain", "<u4")])
MERGE_AT = 65536
INDEX_VERSION = 1


class Location(NamedTuple):
    pack: str
    offset: int
    length: int
    plain_size: int


def _prefix(keys: np.ndarray) -> np.ndarray:
    return keys[:, :8].copy().view(">u8").ravel()


class ChunkIndex:
    def __init__(self) -> None:
        self.packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._keys = np.zeros((0, 32), dtype=np.uint8)
        self._pfx = np.zeros(0, dtype=">u8")
        self._vals = np.zeros(0, dtype=VAL)
        self._new: dict[bytes, tuple[int, int, int, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys) + len(self._new)

    def _pack(self, name: str) -> int:
        n = self._pack_no.get(name)
        if n is None:
            n = self._pack_no[name] = len(self.packs)
            self.packs.append(name)
        return n

    def add(self, chunk_id: bytes, pack: str, offset: int, length: int, plain: int) -> None:
        with self._lock:
            if self._find(chunk_id) is not None:
                return  # first location wins: duplicates in other packs are garbage
            self._new[chunk_id] = (self._pack(pack), offset, length, plain)
            if len(self._new) >= MERGE_AT:
                self._merge()

    def _find(self, chunk_id: bytes) -> tuple[int, int, int, int] | None:
        v = self._new.get(chunk_id)
        if v is not None:
            return v
        if not len(self._pfx):
            return None
        p = int.from_bytes(chunk_id[:8], "big")
        i = int(np.searchsorted(self._pfx, p))
        while i < len(self._pfx) and int(self._pfx[i]) == p:
            if self._keys[i].tobytes() == chunk_id:
                r = self._vals[i]
                return int(r["pack"]), int(r["offset"]), int(r["length"]), int(r["plain"])
            i += 1
        return None

    def get(self, chunk_id: bytes) -> Location | None:
        v = self._find(chunk_id)
        if v is None:
            return None
        return Location(self.packs[v[0]], v[1], v[2], v[3])

    def __contains__(self, chunk_id: bytes) -> bool:
        return self._find(chunk_id) is not None

    def _merge(self) -> None:
        if not self._new:
            return
        ids = b"".join(self._new.keys())
        keys = np.frombuffer(ids, dtype=np.uint8).reshape(-1, 32)
        vals = np.array(list(self._new.values()), dtype=VAL)
        keys = np.concatenate([self._keys, keys])
        vals = np.concatenate([self._vals, vals])
        # sort by the full 32-byte key (lexicographic via void view)
        order = np.argsort(keys.view(np.dtype((np.void, 32))).ravel(), kind="stable")
        self._keys = np.ascontiguousarray(keys[order])
        self._vals = vals[order]
        self._pfx = _prefix(self._keys)
        self._new = {}

    def items(self) -> Iterator[tuple[bytes, Location]]:
        with self._lock:
            self._merge()
        for k, v in zip(self._keys, self._vals, strict=True):
            yield k.tobytes(), Location(self.packs[int(v["pack"])], int(v["offset"]),
                                        int(v["length"]), int(v["plain"]))

    def pack_names(self) -> set[str]:
        with self._lock:
            self._merge()
            used = np.unique(self._vals["pack"])
        return {self.packs[int(i)] for i in used}

    def update(self, other: ChunkIndex) -> None:
        for k, loc in other.items():
            self.add(k, *loc)

    def remove_packs(self, names: Iterable[str]) -> None:
        """Drop every entry that lives in one of these packs."""
        drop = {self._pack_no[n] for n in names if n in self._pack_no}
        if not drop:
            return
        with self._lock:
            self._merge()
            keep = ~np.isin(self._vals["pack"], np.array(sorted(drop), dtype="<u4"))
            self._keys, self._vals = self._keys[keep], self._vals[keep]
            self._pfx = _prefix(self._keys)

    # --- serialisation (index segments in the repository, and the local cache) ---

    def to_bytes(self) -> bytes:
        with self._lock:
            self._merge()
            return msgpack.packb({"version": INDEX_VERSION, "packs": self.packs,
                                  "keys": self._keys.tobytes(), "vals": self._vals.tobytes()})

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "index") -> ChunkIndex:
        try:
            d = msgpack.unpackb(data)
            if d["version"] != INDEX_VERSION:
                raise IntegrityError(f"{what}: unknown index version {d['version']}")
            packs = [str(p) for p in d["packs"]]
            keys = np.frombuffer(d["keys"], dtype=np.uint8).reshape(-1, 32)
            vals = np.frombuffer(d["vals"], dtype=VAL)
        except IntegrityError:
            raise
        except Exception:  # noqa: BLE001 - malformed input is one integrity error
            raise IntegrityError(f"{what}: malformed") from None
        if len(keys) != len(vals) or (len(vals) and int(vals["pack"].max()) >= len(packs)):
            raise IntegrityError(f"{what}: inconsistent")
        idx = cls()
        for p in packs:
            idx._pack(p)
        # re-sort defensively: an index from the repository is input, not trusted state
        order = np.argsort(keys.view(np.dtype((np.void, 32))).ravel(), kind="stable")
        idx._keys = np.ascontiguousarray(keys[order])
        idx._vals = vals[order].copy()
        idx._pfx = _prefix(idx._keys)
        return idx
