"""Repairing the repository layer: rebuild the index from the packs, salvage damaged packs.

Works from a ``RepoCheck`` (check.py) made under the same exclusive lock, so nothing
changes underneath. Order, each step durable before the next, so that an interruption
anywhere leaves a repository at least as good as before:

1. the damaged packs are copied to ``quarantine/packs/`` (never read again): repair
   never deletes a byte it could not read;
2. every chunk of a damaged pack that still opens (authenticated, id verified) is
   copied, sealed as it is and in its pack order, into new packs; copies that are good
   elsewhere are skipped;
3. one index segment is written naming every chunk of the healthy and new packs;
4. the old index segments are deleted;
5. the damaged packs are deleted — except where step 2 wrote a pack of the same name.

Packs are named by the hash of their bytes, so salvaging every chunk of a pack whose
damage lay outside its chunks (trailer, TOC, padding) rebuilds that very pack, byte for
byte, under its old name: the new index names it, and deleting "the damaged pack" then
would delete the repaired one. Step 5 therefore never deletes a name step 2 wrote.

Chunks that could not be salvaged are then missing: the archive repair
(archive/check.py) marks the items that need them, and the next backup that meets the
same data stores them again, which heals those items.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import IntegrityError, ObjectMissing
from .check import PackInfo, RepoCheck
from .index import ChunkIndex
from .pack import PackWriter, pack_key
from .repo import Repository

Log = Callable[[str], None]


def repair_repository(repo: Repository, rc: RepoCheck, log: Log) -> bool:
    """Make the index match the packs again; return True if anything was changed."""
    if not rc.index_needs_rebuild:
        return False
    damaged = [p for p in rc.packs.values() if p.damaged]
    quarantined = [p for p in damaged if _quarantine(repo, p)]
    fresh = ChunkIndex()
    # healthy copies first: the index keeps the first location of a chunk
    for p in rc.packs.values():
        if not p.damaged and p.toc is not None:
            for e in p.toc:
                fresh.add(e.id, p.name, e.offset, e.length, e.plain_size)
    written = _salvage(repo, rc, quarantined, fresh, log)
    new_segment = repo.write_index_segment(fresh)
    log(f"index rebuilt from {len(rc.packs) - len(damaged)} healthy pack(s): {len(fresh)} "
        f"chunks in {new_segment}")
    for name in rc.segments:
        try:
            repo.store.delete(name)
        except ObjectMissing:
            pass
    for p in quarantined:
        if p.name in written:
            log(f"pack {p.name[:16]} rebuilt intact from its salvaged chunks (the damaged "
                "copy is in quarantine/packs/)")
            continue
        try:
            repo.store.delete(pack_key(p.name))
        except ObjectMissing:
            pass
        log(f"pack {p.name[:16]} moved to quarantine/packs/ (remove it by hand once you no "
            "longer need it)")
    repo.reload_index()
    return True


def _salvage(repo: Repository, rc: RepoCheck, damaged: list[PackInfo], fresh: ChunkIndex,
             log: Log) -> set[str]:
    """Copy the readable chunks of ``damaged`` into new packs; return the names written."""
    writer = PackWriter(repo.pack_size)
    pending: set[bytes] = set()  # in the pack being filled
    written: set[str] = set()

    def ship() -> None:
        nonlocal writer
        if not len(writer):
            return
        name, data, entries = writer.finish(repo.codec)
        repo.store.store(pack_key(name), data)
        written.add(name)
        for e in entries:
            fresh.add(e.id, name, e.offset, e.length, e.plain_size)
        writer = PackWriter(repo.pack_size)
        pending.clear()

    for p in damaged:
        # where the chunks are: the TOC, or else what the index segments said
        entries = p.toc if p.toc is not None else rc.segment_entries(p.name)
        entries = sorted(entries, key=lambda e: e.offset)  # segments list them by id
        try:
            data = repo.store.load(pack_key(p.name))
        except ObjectMissing:
            continue
        saved = 0
        for e in entries:
            if e.id in fresh or e.id in pending:
                saved += 1  # a good copy is elsewhere
                continue
            blob = data[e.offset : e.offset + e.length]
            if len(blob) != e.length:
                continue
            try:
                plain = repo.codec.open_chunk(e.id, blob)
            except IntegrityError:
                continue
            writer.add(e.id, blob, len(plain))
            pending.add(e.id)
            saved += 1
            if writer.full:
                ship()
        log(f"pack {p.name[:16]}: {p.error or next(iter(p.bad.values()))}; "
            f"{saved} of {len(entries)} known chunk(s) salvaged")
    ship()
    return written


def _quarantine(repo: Repository, p: PackInfo) -> bool:
    """Copy a damaged pack to quarantine; False if it is gone (nothing to salvage)."""
    try:
        repo.store.store(f"quarantine/packs/{p.name}", repo.store.load(pack_key(p.name)))
    except ObjectMissing:
        return False
    return True
