"""``check --repair``: bring a damaged repository back to a consistent state.

Under the exclusive lock, in this order:

1. the repository check (with ``--verify-data``: every chunk is opened);
2. the repository repair (repository/repair.py): index rebuilt from the packs, readable
   chunks of damaged packs salvaged, damaged packs quarantined;
3. a missing, damaged or rolled-back manifest is rebuilt from the archive metadata
   objects, each authenticated by its id (``--undelete-archives``: also adds the ones a
   manifest no longer names);
4. archives: unreadable metadata is dropped from the manifest; item streams with lost
   chunks are rewritten with the items that could be read; items whose data chunks are
   missing are marked (``Item.health``) — their extents keep the original chunk ids, so
   a later backup that stores those chunks again heals them, and a restore reports the
   damaged byte ranges instead of producing zeros; marks of healed items are cleared.

A config the manifest does not authenticate is never "repaired": that is what an
attacker's edit looks like.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import IntegrityError, UnsupportedVersion
from ..repository.manifest import ArchiveRef, Manifest
from ..repository.repair import repair_repository
from ..repository.repo import Repository
from ..repository.writer import ChunkWriter
from .check import (
    CheckOptions,
    CheckReport,
    ChunkState,
    damaged_ranges,
    load_meta,
    read_items_robust,
    run_check,
)
from .items import write_item_stream

Log = Callable[[str], None]


def repair(repo: Repository, opts: CheckOptions, log: Log, undelete: bool = False
           ) -> CheckReport:
    """Repair, then check again; the returned report lists what could not be recovered."""
    if repo.manifest_problem and repo.manifest_problem[0] == "config":
        raise IntegrityError("repository config does not match the manifest: it was changed "
                             "outside diskvault (tampered?); restore the original config file "
                             "— 'check --repair' does not accept a changed config")
    before = run_check(repo, CheckOptions(repository=True, archives=False,
                                          verify_data=opts.verify_data, subset=opts.subset,
                                          progress=opts.progress))
    assert before.repo_check is not None
    repair_repository(repo, before.repo_check, log)
    if repo.manifest_problem or undelete:
        rebuild_manifest(repo, log, keep_current=not repo.manifest_problem)
    repair_archives(repo, log)
    return run_check(repo, CheckOptions(verify_data=opts.verify_data, subset=opts.subset,
                                        glob=opts.glob))


def rebuild_manifest(repo: Repository, log: Log, keep_current: bool) -> None:
    """A manifest naming every readable archive metadata object (plus, ``keep_current``,
    the archives the current manifest names)."""
    m = Manifest(archives=dict(repo.manifest.archives) if keep_current else {})
    known = {r.id for r in m.archives.values()}
    found: list[tuple[float, str, bytes]] = []
    for key, _ in repo.store.list("archives"):
        try:
            aid = bytes.fromhex(key.rsplit("/", 1)[-1])
        except ValueError:
            continue
        if len(aid) != 32 or aid in known:
            continue
        try:
            meta = repo.load_archive(ArchiveRef(aid.hex()[:16], aid, 0.0))
        except IntegrityError as e:
            log(f"{key}: not recovered: {e}")
            continue
        name, when = meta.get("name"), meta.get("time")
        if isinstance(name, str) and name and "/" not in name and isinstance(when, int | float):
            found.append((float(when), name, aid))
    for when, name, aid in sorted(found):
        unique, n = name, 0
        while unique in m.archives:
            n += 1
            unique = f"{name}.{n}"
        m.archives[unique] = ArchiveRef(unique, aid, when)
        log(f"archive {unique!r} recovered from its metadata")
    repo.replace_manifest(m)
    log(f"manifest rebuilt: {len(m.archives)} archive(s)")


def repair_archives(repo: Repository, log: Log) -> None:
    repo.reload_index()
    state = ChunkState(repo, {}, False)
    drop: list[ArchiveRef] = []
    rewritten: list[tuple[ArchiveRef, dict]] = []
    writer = repo.writer()
    try:
        for ref in repo.manifest.sorted_archives():
            try:
                meta = load_meta(repo, ref)
            except UnsupportedVersion:
                continue  # a newer diskvault's archive: not ours to touch
            except IntegrityError as e:
                log(f"archive {ref.name!r} removed from the manifest: {e}")
                drop.append(ref)
                continue
            if _repair_meta(repo, ref, meta, state, writer, log):
                rewritten.append((ref, meta))
        writer.commit()  # item-stream chunks durable before the metadata naming them
    finally:
        writer.close()
    if not drop and not rewritten:
        return
    new = {ref.name: (ref, ArchiveRef(ref.name, repo.store_archive_meta(meta), ref.time))
           for ref, meta in rewritten}

    def change(m: Manifest) -> None:
        for ref in drop:
            if m.archives.get(ref.name) == ref:
                del m.archives[ref.name]
        for name, (old, ref) in new.items():
            if m.archives.get(name) == old:
                m.archives[name] = ref

    repo.update_manifest(change, allow_replace=True)
    for old, _ in new.values():
        repo.delete_archive_meta(old.id)


def _repair_meta(repo: Repository, ref: ArchiveRef, meta: dict, state: ChunkState,
                 writer: ChunkWriter, log: Log) -> bool:
    """Mark damaged items, drop lost item-stream chunks; True if ``meta`` changed."""
    items, lost = read_items_robust(meta["items"], repo.get_chunk)
    changed = bool(lost)
    if lost:
        if not isinstance(meta.get("repaired"), list):
            meta["repaired"] = []
        meta["repaired"].append(
            {"time": time.time(), "lost_item_chunks": len(lost),
             "items_before": meta.get("nitems"), "items_after": len(items)})
        log(f"archive {ref.name!r}: {len(lost)} item metadata chunk(s) lost; "
            f"{len(items)} item(s) recovered")
    for item in items:
        if item.extents is None:
            continue
        ranges = damaged_ranges(item, state)
        old = (item.health or {}).get("damaged")
        if ranges and old != ranges:
            item.health = {"damaged": ranges, "marked": time.time()}
            log(f"archive {ref.name!r}: {item.path}: marked damaged ({len(ranges)} "
                "chunk(s) missing)")
        elif not ranges and item.health:
            item.health = None
            log(f"archive {ref.name!r}: {item.path}: healed, mark cleared")
        else:
            continue
        changed = True
    if changed:
        meta["items"] = write_item_stream(items, lambda data: _store(repo, writer, data),
                                          repo.chunker_seed)
        meta["nitems"] = len(items)
    return changed


def _store(repo: Repository, writer: ChunkWriter, data: bytes) -> bytes:
    cid = repo.id_hash(data)
    if not writer.known(cid):
        writer.add(cid, repo.codec.seal(cid, data), len(data))
    return cid
