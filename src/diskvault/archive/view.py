"""Reading a committed archive: its metadata and its items."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from ..errors import IntegrityError, UnsupportedVersion
from ..repository.manifest import ArchiveRef
from .create import ARCHIVE_VERSION
from .items import read_item_stream
from .model import HARDLINK, Item
from .patterns import PathMatcher

if TYPE_CHECKING:
    from .reader import ArchiveSource


@dataclass
class ArchiveView:
    repo: ArchiveSource  # a read-only role: the Repository, or anything that reads like it
    ref: ArchiveRef
    meta: dict

    @classmethod
    def open(cls, repo: ArchiveSource, name: str) -> ArchiveView:
        ref = repo.archive_ref(name)
        meta = repo.load_archive(ref)
        if not isinstance(meta, dict) or "version" not in meta:
            raise IntegrityError(f"archive {name!r}: metadata is malformed")
        if meta["version"] != ARCHIVE_VERSION:
            raise UnsupportedVersion(f"archive {name!r}", meta["version"], ARCHIVE_VERSION)
        return cls(repo, ref, meta)

    @property
    def name(self) -> str:
        return self.ref.name

    @cached_property
    def items(self) -> list[Item]:
        try:
            return list(read_item_stream(self.meta.get("items", []), self.repo.get_chunk))
        except IntegrityError as e:
            raise IntegrityError(f"archive {self.name!r}: item metadata: {e}") from None


def select_items(items: list[Item], patterns: list[str],
                 unmatched: list[str] | None = None) -> list[Item]:
    """Items matching any of ``patterns`` (archive/patterns.py: a path selects itself and
    everything below it; globs and Borg's ``sh:``/``fm:``/``re:``/``pp:`` styles).
    Patterns that matched nothing are appended to ``unmatched``."""
    if not patterns:
        return items
    matcher = PathMatcher.parse(patterns)
    out = [i for i in items if matcher(i.path)]
    if unmatched is not None:
        unmatched.extend(matcher.unmatched())
    return _promote_hardlinks(items, out)


def _promote_hardlinks(items: list[Item], selected: list[Item]) -> list[Item]:
    """A selected hard link whose master file is not selected takes the master's content
    (the first such link becomes the file; later links point at it)."""
    chosen = {i.path for i in selected}
    by_path = {i.path: i for i in items}
    moved: dict[str, str] = {}  # master path → path of the link that now holds the content
    out = []
    for i in selected:
        if i.type == HARDLINK and i.target not in chosen:
            if i.target in moved:
                i = replace(i, target=moved[i.target])
            elif i.target in by_path:
                master = by_path[i.target]
                moved[i.target] = i.path
                i = replace(master, path=i.path)
        out.append(i)
    return out
