"""Which chunks the archives use: what ``compact`` must keep."""

from __future__ import annotations

from ..errors import IntegrityError, UnsupportedVersion
from ..repository.idset import IdSet
from ..repository.repo import Repository
from .view import ArchiveView


def referenced_chunks(repo: Repository) -> IdSet:
    """Every chunk id of every archive: item-stream chunks, data extents, the bases and
    patches of delta extents, and block-fingerprint chunks.

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
                if item.extents is not None:
                    for cid in item.extents.chunk_ids():
                        ids.add(cid)
                for cid in item.fingerprints or ():
                    ids.add(cid)
        except (IntegrityError, UnsupportedVersion) as e:
            raise IntegrityError(f"cannot tell which chunks are in use: {e} — run "
                                 "'check --repair', or delete that archive") from None
    return ids
