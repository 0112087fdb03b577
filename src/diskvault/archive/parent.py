"""The parent of a backup: which archive, which item, its extents and block fingerprints.

A backup with a parent compares each changed window with the parent's window at the
same offset (delta.py). The parent is by default the newest earlier archive of the same
host with the same source identity (``meta["source_id"]``); ``--parent`` names one.
``ChangedRanges`` is the caller's word on which byte ranges changed since the parent
(``--changed-extents``, a QEMU dirty bitmap): the rest is taken from the parent unread.
"""

from __future__ import annotations

import bisect
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import IntegrityError, ObjectMissing, UsageError
from ..repository.repo import Repository
from ..source.content import DATA
from .delta import BLOCK, FP_CHUNK_BLOCKS, FP_LEN
from .model import DELTA, Item, Record


@dataclass
class ParentArchive:
    name: str
    items: dict[str, Item]  # content items by path

    @classmethod
    def load(cls, repo: Repository, name: str) -> ParentArchive:
        from .view import ArchiveView  # view imports create, which imports this module

        view = ArchiveView.open(repo, name)
        return cls(name, {i.path: i for i in view.items if i.extents is not None})

    def item_for(self, path: str, size: int) -> Item | None:
        item = self.items.get(path)
        return item if item is not None and item.size == size else None


def find_parent(repo: Repository, source_id: object) -> str | None:
    """The newest archive of this host with the same source identity, or None."""
    host = socket.gethostname()
    for ref in reversed(repo.manifest.sorted_archives()):
        try:
            meta = repo.load_archive(ref)
        except (IntegrityError, ObjectMissing):
            continue  # a damaged archive is no parent
        if meta.get("hostname") == host and meta.get("source_id") == source_id:
            return ref.name
    return None


class ParentCursor:
    """The parent item's extents, window by window, in increasing offset order."""

    def __init__(self, item: Item) -> None:
        assert item.extents is not None
        self._it: Iterator[Record] = item.extents.records()
        self._rec: Record | None = None
        self._start = 0  # offset of self._rec
        self._next = 0  # offset after self._rec

    def window(self, a: int, b: int) -> list[Record] | None:
        """The parent's records covering ``[a, b)`` (zero/unused runs cut to fit), or None
        when a data or delta extent there does not cover exactly this window."""
        out: list[Record] = []
        pos = a
        while pos < b:
            while self._next <= pos:
                rec = next(self._it, None)
                if rec is None:
                    return None
                self._rec, self._start = rec, self._next
                self._next += rec[1]
            assert self._rec is not None
            kind = self._rec[0]
            if kind in (DATA, DELTA):
                if self._start != a or self._next != b:
                    return None
                return [self._rec]
            n = min(self._next, b) - pos
            out.append((kind, n, None, None))
            pos += n
        return out


class FpReader:
    """The parent item's block fingerprints, fetched one fingerprint chunk at a time."""

    def __init__(self, ids: list[bytes], fetch: Callable[[bytes], bytes]) -> None:
        self.ids, self.fetch = ids, fetch
        self._k = -1
        self._chunk = b""

    def get(self, first: int, n: int) -> bytes | None:
        """Fingerprints of blocks ``first .. first+n-1``; None if they cannot be read."""
        out = []
        while n > 0:
            k, i = divmod(first, FP_CHUNK_BLOCKS)
            if k != self._k:
                if k >= len(self.ids):
                    return None
                try:
                    self._chunk = self.fetch(self.ids[k])
                except (IntegrityError, ObjectMissing):
                    return None
                self._k = k
            take = min(n, FP_CHUNK_BLOCKS - i)
            part = self._chunk[i * FP_LEN : (i + take) * FP_LEN]
            if len(part) != take * FP_LEN:
                return None
            out.append(part)
            first, n = first + take, n - take
        return b"".join(out)


class ChangedRanges:
    """Byte ranges that changed since ``parent`` in content of ``size`` bytes."""

    def __init__(self, size: int, parent: str, extents: list[tuple[int, int]]) -> None:
        self.size, self.parent = size, parent
        merged: list[list[int]] = []
        for off, n in sorted(extents):
            if n <= 0:
                continue
            if merged and off <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], off + n)
            else:
                merged.append([off, off + n])
        self._starts = [s for s, _ in merged]
        self._ranges = merged

    @classmethod
    def load(cls, path: str) -> ChangedRanges:
        """Read ``{"size": N, "parent": "ARCHIVE", "extents": [[offset, length], ...]}``."""
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except OSError as e:
            raise UsageError(f"--changed-extents {path}: {e.strerror}") from None
        except ValueError as e:
            raise UsageError(f"--changed-extents {path}: not JSON ({e})") from None
        bad = UsageError(f"--changed-extents {path}: expected {{\"size\": N, \"parent\": "
                         "\"ARCHIVE\", \"extents\": [[offset, length], ...]}")
        if not isinstance(doc, dict) or not isinstance(doc.get("parent"), str):
            raise bad
        size, ext = doc.get("size"), doc.get("extents")
        if type(size) is not int or size < 0 or not isinstance(ext, list):
            raise bad
        out = []
        for rng in ext:
            if not (isinstance(rng, list) and len(rng) == 2
                    and all(type(v) is int for v in rng)):
                raise bad
            off, n = rng
            if off < 0 or n < 0 or off + n > size:
                raise UsageError(f"--changed-extents {path}: extent [{off}, {n}] lies outside "
                                 f"the {size} bytes of the content")
            out.append((off, n))
        return cls(size, doc["parent"], out)

    def check(self, size: int, parent: str, what: str) -> None:
        if parent != self.parent:
            raise UsageError(f"--changed-extents: the list is relative to archive "
                             f"{self.parent!r}, the parent is {parent!r}")
        if size != self.size:
            raise UsageError(f"--changed-extents: the list is for {self.size} bytes, {what} "
                             f"has {size}: it belongs to other content")

    def shifted(self, offset: int, size: int) -> ChangedRanges:
        """The ranges within ``[offset, offset+size)``, relative to ``offset`` (a region
        of a disk)."""
        out = [(max(s, offset) - offset, min(e, offset + size) - max(s, offset))
               for s, e in self._ranges if e > offset and s < offset + size]
        return ChangedRanges(size, self.parent, out)

    def total(self) -> int:
        return sum(e - s for s, e in self._ranges)

    def blocks_in(self, a: int, b: int) -> list[int]:
        """Offsets of the 4 KiB blocks (from ``a``) of ``[a, b)`` that touch a range."""
        out: list[int] = []
        i = max(0, bisect.bisect_right(self._starts, a) - 1)
        while i < len(self._ranges) and self._ranges[i][0] < b:
            s, e = self._ranges[i]
            s, e = max(s, a), min(e, b)
            if e > s:
                first = (s - a) // BLOCK
                last = (e - a - 1) // BLOCK
                if out and out[-1] >= first:
                    first = out[-1] + 1
                out.extend(range(first, last + 1))
            i += 1
        return out
