"""Reading a committed archive: its metadata and its items.

An archive whose item stream lost chunks in a ``check --repair`` (``meta["repaired"]``)
still opens and lists the items that survived, but it is **incomplete**: the lost items'
names, sizes and content are unknown, so restoring "the archive" (or its items
concatenated to stdout) from what is left would be wrong data. ``loss`` says so, and
restore paths call ``require_complete`` before writing a byte.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from ..errors import ArchiveIncomplete, IntegrityError, UnsupportedVersion
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
            items = list(read_item_stream(self.meta.get("items", []), self.repo.get_chunk))
        except IntegrityError as e:
            raise IntegrityError(f"archive {self.name!r}: item metadata: {e}") from None
        # writers (create, repair) record the count: a stream that decodes to another
        # number of items is never taken for the whole archive
        n = self.meta.get("nitems")
        if type(n) is int and n != len(items):
            raise IntegrityError(f"archive {self.name!r}: item metadata holds {len(items)} "
                                 f"item(s), the archive records {n}")
        return items

    @property
    def loss(self) -> str | None:
        """What a repair recorded losing from the item stream, as a message; None if
        nothing was lost."""
        return describe_loss(self.name, self.meta.get("repaired"))

    def require_complete(self, allow_loss: bool) -> str | None:
        """Refuse (ArchiveIncomplete) an archive that lost items, unless ``allow_loss``
        (``--continue-on-error``): then return the warning to report, exit code 1."""
        loss = self.loss
        if loss and not allow_loss:
            raise ArchiveIncomplete(loss, "--continue-on-error restores the items that are left")
        return loss


def describe_loss(name: str, repaired: object) -> str | None:
    """``meta["repaired"]`` (a list of ``{lost_item_chunks, items_before, items_after}``
    records, format.md) as one message; None if it records no loss."""
    if not repaired:
        return None
    recs = repaired if isinstance(repaired, list) else [repaired]
    chunks = [r.get("lost_item_chunks") if isinstance(r, dict) else None for r in recs]
    lost = sum(c for c in chunks if type(c) is int)
    first, last = recs[0], recs[-1]
    before = first.get("items_before") if isinstance(first, dict) else None
    after = last.get("items_after") if isinstance(last, dict) else None
    counts = (f" ({before} item(s) before, {after} after)"
              if type(before) is int and type(after) is int else "")
    return (f"archive {name!r} is incomplete: a repair lost {lost or 'some'} chunk(s) of its "
            f"item metadata{counts}; the items in them cannot be listed or restored")


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
