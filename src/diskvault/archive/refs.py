"""Which chunks the archives use: what ``compact`` must keep."""

from __future__ import annotations

from ..errors import IntegrityError, UnsupportedVersion
from ..repository.idset import IdSet
from ..repository.repo import Repository
from ..source.content import DATA
from .view import ArchiveView


def referenced_chunks(repo: Repository) -> IdSet:
    """Every chunk id of every archive: item-stream chunks and data extents.

    An archive that cannot be read completely stops this with an error: without all
    of its references, deleting anything could delete data that archive still needs.
    """
    ids = IdSet()
    for ref in repo.manifest.sorted_archives():
        try:
            view = ArchiveView.open(repo, ref.name)
            for cid in view.meta.get("items", []):
                ids.add(bytes(cid))
            for item in view.items:
                for kind, _, cid in item.extents or ():
                    if kind == DATA and cid is not None:
                        ids.add(cid)
        except (IntegrityError, UnsupportedVersion) as e:
            raise IntegrityError(f"cannot tell which chunks are in use: {e} — run "
                                 "'check --repair', or delete that archive") from None
    return ids
