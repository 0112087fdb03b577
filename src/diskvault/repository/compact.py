"""Freeing space: delete packs nothing references, repack packs that are mostly garbage.

Runs under the exclusive repository lock, which every ``create`` also needs (shared)
for its whole run: no chunk a running backup is about to reference can be deleted.

Order, each step durable before the next (a crash anywhere loses nothing committed):

0. packs no index segment names and no archive references are deleted at once — safe,
   as nothing points at them, and it frees space first (a repository that filled up
   during ``create`` is full of exactly these);
1. the referenced chunks of packs with more than ``threshold`` garbage are copied,
   sealed as they are and verified, into new packs;
2. one index segment naming every surviving chunk is written;
3. the old index segments are deleted;
4. the emptied and repacked packs are deleted;
5. archive metadata no manifest names (interrupted create/delete) is deleted.

No index segment ever names a deleted pack: segments go before their packs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import AppendOnlyError, IntegrityError, ObjectMissing, StorageFull
from .idset import IdSet
from .index import ChunkIndex, Location
from .pack import PackWriter, pack_key
from .repo import Repository

Log = Callable[[str], None]


@dataclass
class CompactStats:
    packs_before: int = 0
    bytes_before: int = 0
    packs_deleted: int = 0  # nothing referenced in them
    packs_repacked: int = 0
    packs_written: int = 0
    segments_replaced: int = 0
    archive_meta_deleted: int = 0
    chunks_dropped: int = 0
    bytes_freed: int = 0  # net: deleted minus written
    missing_referenced: int = 0  # referenced chunks in no pack (check reports them)
    temporaries_removed: int = 0  # partial writes left by killed writers
    kept_damaged: list[str] = field(default_factory=list)  # packs not repacked: damaged
    stopped: str | None = None  # why repacking stopped early (storage full)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Plan:
    sizes: dict[str, int]  # every pack → bytes
    used: dict[str, int]  # pack → bytes of referenced chunks in it
    in_use: int  # referenced chunks found in the index
    dead: list[str]  # nothing referenced
    sparse: list[str]  # more garbage than the threshold
    keep: dict[str, list[tuple[bytes, Location]]]  # sparse pack → its referenced chunks


def compact(repo: Repository, referenced: IdSet, archive_ids: set[bytes],
            threshold: float = 0.1, dry_run: bool = False, log: Log | None = None
            ) -> CompactStats:
    """``referenced``: every chunk id an archive uses (archive/refs.py); ``archive_ids``:
    the ids the manifest names (other archive metadata is garbage)."""
    if repo.append_only:
        raise AppendOnlyError("compact")
    say = log or (lambda _m: None)
    idx = repo.reload_index()
    if repo.index_problems:
        # an unreadable pack might hold chunks nothing else locates: never guess
        raise IntegrityError(f"cannot compact: {repo.index_problems[0]} — run "
                             "'check --repair' first")
    plan = _plan(repo, idx, referenced, threshold)
    st = CompactStats(packs_before=len(plan.sizes), bytes_before=sum(plan.sizes.values()))
    st.missing_referenced = len(referenced) - plan.in_use  # the rest are in no pack
    segments = dict(repo.store.list("index"))
    garbage_meta = [n for n, _ in repo.store.list("archives")
                    if _archive_id(n) not in archive_ids]
    stale = repo.store.temporaries(remove=not dry_run)  # partial writes of dead writers
    st.temporaries_removed = len(stale)
    st.bytes_freed += sum(n for _, n in stale)
    if dry_run:
        st.packs_deleted, st.packs_repacked = len(plan.dead), len(plan.sparse)
        st.bytes_freed = sum(plan.sizes[p] for p in plan.dead) + sum(
            plan.sizes[p] - plan.used[p] for p in plan.sparse)
        st.archive_meta_deleted = len(garbage_meta)
        return st
    # 0: packs no segment names and nothing references go first: frees space at once
    early = {p for p in plan.dead if p in repo.toc_packs}
    for p in early:
        st.bytes_freed += _delete(repo, pack_key(p), plan.sizes[p])
        st.packs_deleted += 1
    moved, repacked = _repack(repo, plan, st, say)  # 1
    gone = set(plan.dead) | repacked
    if gone - early or len(segments) > 1 or repo.toc_packs - gone:
        new = ChunkIndex()
        for cid, loc in idx.items():
            if loc.pack in gone:
                st.chunks_dropped += cid not in referenced
                continue
            new.add(cid, *loc)
        for cid, loc in moved:
            new.add(cid, *loc)
        name = repo.write_index_segment(new)  # 2
        st.bytes_freed -= len(repo.store.load(name))
        for seg, size in segments.items():  # 3
            st.bytes_freed += _delete(repo, seg, size)
            st.segments_replaced += 1
        # packs are named by their content: never delete a name step 1 just wrote
        written = {loc.pack for _, loc in moved}
        for p in gone - early - written:  # 4
            st.bytes_freed += _delete(repo, pack_key(p), plan.sizes[p])
            st.packs_deleted += p not in repacked
    for n in garbage_meta:  # 5
        st.bytes_freed += _delete(repo, n, 0)
        st.archive_meta_deleted += 1
    repo.reload_index()
    return st


def _plan(repo: Repository, idx: ChunkIndex, referenced: IdSet, threshold: float) -> _Plan:
    sizes = {k.rsplit("/", 1)[-1]: s for k, s in repo.store.list("packs")}
    used: dict[str, int] = defaultdict(int)
    stored: dict[str, int] = defaultdict(int)
    in_use = 0
    for _cid, loc, ref in _flagged(idx, referenced):
        stored[loc.pack] += loc.length
        if ref:
            used[loc.pack] += loc.length
            in_use += 1
    dead = [p for p in sizes if not used[p]]
    # garbage share of the chunk bytes; duplicates indexed elsewhere count as garbage too
    sparse = {p for p in sizes if used[p] and
              (max(stored[p], 1) - used[p]) / max(stored[p], 1) > threshold}
    # a second pass keeps entries only where they are needed: memory stays per sparse pack
    keep: dict[str, list[tuple[bytes, Location]]] = defaultdict(list)
    for cid, loc, ref in _flagged(idx, referenced):
        if ref and loc.pack in sparse:
            keep[loc.pack].append((cid, loc))
    return _Plan(sizes, used, in_use, dead, sorted(sparse), keep)


def _flagged(idx: ChunkIndex, referenced: IdSet, n: int = 65536
             ) -> Iterator[tuple[bytes, Location, bool]]:
    """Index entries with their "referenced" flag, looked up one vectorised batch at a
    time: millions of ids searched one by one would take minutes."""
    batch: list[tuple[bytes, Location]] = []
    for entry in idx.items():
        batch.append(entry)
        if len(batch) == n:
            yield from _flag(batch, referenced)
            batch = []
    yield from _flag(batch, referenced)


def _flag(batch: list[tuple[bytes, Location]], referenced: IdSet
          ) -> Iterator[tuple[bytes, Location, bool]]:
    flags = referenced.contains_many(b"".join(cid for cid, _ in batch))
    for (cid, loc), ref in zip(batch, flags, strict=True):
        yield cid, loc, bool(ref)


def _repack(repo: Repository, plan: _Plan, st: CompactStats, say: Log
            ) -> tuple[list[tuple[bytes, Location]], set[str]]:
    """Copy the referenced chunks of sparse packs into new packs; a source pack counts as
    repacked only once every chunk of it is in a stored pack."""
    moved: list[tuple[bytes, Location]] = []
    repacked: set[str] = set()
    writer = PackWriter(repo.pack_size)
    filling: list[str] = []  # sources whose chunks are all in ``writer`` or shipped

    def ship() -> None:
        nonlocal writer, filling
        if len(writer):
            name, data, entries = writer.finish(repo.codec)
            repo.store.store(pack_key(name), data)
            st.packs_written += 1
            st.bytes_freed -= len(data)
            moved.extend((e.id, Location(name, e.offset, e.length, e.plain_size))
                         for e in entries)
        repacked.update(filling)
        writer, filling = PackWriter(repo.pack_size), []

    try:
        for p in plan.sparse:
            try:
                data = repo.store.load(pack_key(p))
                blobs = [(cid, data[loc.offset : loc.offset + loc.length], loc.plain_size)
                         for cid, loc in plan.keep[p]]
                for cid, blob, _ in blobs:  # verified before the original may go
                    repo.codec.open_chunk(cid, blob)
            except (IntegrityError, ObjectMissing) as e:
                st.kept_damaged.append(p)
                say(f"pack {p[:16]} not repacked: {e} (run 'check --repair --verify-data')")
                continue
            for cid, blob, plain in blobs:
                writer.add(cid, blob, plain)
                if writer.full:
                    ship()  # sources named in ``filling`` may still be partly unshipped
            filling.append(p)
        ship()
    except StorageFull as e:
        st.stopped = str(e)
        say(f"repacking stopped: {e}")
    st.packs_repacked = len(repacked)
    return moved, repacked


def _delete(repo: Repository, name: str, size: int) -> int:
    try:
        repo.store.delete(name)
    except ObjectMissing:
        return 0
    return size


def _archive_id(name: str) -> bytes | None:
    try:
        return bytes.fromhex(name.rsplit("/", 1)[-1])
    except ValueError:
        return None
