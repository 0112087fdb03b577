"""Checking the repository layer: manifest, index segments, packs and (optionally) chunks.

What is read: the manifest; every index segment; the trailer and table of contents of
every pack (two range reads each) — or, with ``verify_data``, every pack in full: its
name (the BLAKE3 of its bytes) and every chunk in it (authentication, id, size). Nothing
is written. The result names each damaged object and the chunks that cannot be read at
their index location, so the archive check (archive/check.py) can name the items and
byte ranges they hit, and ``repair.py`` knows what to rebuild and what to salvage.

Left by interrupted sessions, and therefore *not* problems: packs no index segment names
(read by their TOC; dedup reuses them) and archive metadata no manifest names.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from ..errors import IntegrityError, ObjectMissing
from .index import ChunkIndex
from .pack import PackEntry, pack_key, parse_pack, read_toc
from .repo import Repository

ProgressFn = Callable[[int, int], None]  # (done, total) bytes
_PACK_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass
class Problem:
    """One thing found wrong; ``message`` is the line a user reads."""

    kind: str  # manifest, index, pack, archive, item
    object: str  # the damaged object: a storage name, or an archive name
    message: str
    archive: str | None = None
    path: str | None = None
    # item problems: [first byte, last byte, "missing" | "damaged", chunk id hex], inclusive
    ranges: list[list] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class PackInfo:
    name: str
    size: int
    toc: list[PackEntry] | None = None
    error: str | None = None  # what is wrong with the pack as a whole (TOC, name hash)
    bad: dict[bytes, str] = field(default_factory=dict)  # chunk id → why it cannot be read
    segments: list[str] = field(default_factory=list)  # index segments naming this pack

    @property
    def damaged(self) -> bool:
        return bool(self.error or self.bad)


@dataclass
class RepoCheck:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    packs: dict[str, PackInfo] = field(default_factory=dict)
    segments: dict[str, ChunkIndex | None] = field(default_factory=dict)  # None: damaged
    bad_chunks: dict[bytes, str] = field(default_factory=dict)  # at their index location
    uncovered: list[str] = field(default_factory=list)  # packs no readable segment names
    index_mismatch: bool = False  # a segment names missing packs or disagrees with a TOC
    stats: dict = field(default_factory=dict)

    @property
    def index_needs_rebuild(self) -> bool:
        return (self.index_mismatch or bool(self.uncovered)
                or any(s is None for s in self.segments.values())
                or any(p.damaged for p in self.packs.values()))

    def segment_entries(self, pack: str) -> list[PackEntry]:
        """Where the readable segments say the chunks of ``pack`` are (its TOC may be lost)."""
        out: dict[bytes, PackEntry] = {}
        for seg_name in self.packs[pack].segments:
            seg = self.segments.get(seg_name)
            for cid, loc in (seg.items() if seg is not None else ()):
                if loc.pack == pack:
                    out.setdefault(cid, PackEntry(cid, loc.offset, loc.length, loc.plain_size))
        return list(out.values())


def check_repository(repo: Repository, verify_data: bool = False, subset: float | None = None,
                     progress: ProgressFn | None = None, seed: int | None = None) -> RepoCheck:
    """``subset``: verify only this fraction (0..1] of the packs, chosen at random."""
    res = RepoCheck()
    if repo.manifest_problem:
        res.problems.append(Problem("manifest", "manifest", repo.manifest_problem[1]))
    counts = _check_segments(repo, res)
    _list_packs(repo, res, counts)
    chosen: set[str] = set()
    if verify_data:
        names = sorted(res.packs)
        k = len(names) if subset is None else min(len(names), math.ceil(len(names) * subset))
        chosen = set(random.Random(seed).sample(names, k))
    total = sum(p.size for p in res.packs.values())
    done = 0
    for p in res.packs.values():
        if p.name in chosen:
            _verify_pack(repo, res, p)
        else:
            _read_toc(repo, p)
        _compare_segments(res, p, counts)
        done += p.size
        if progress:
            progress(done, total)
    _summarise(repo, res, chosen)
    return res


def _check_segments(repo: Repository, res: RepoCheck) -> dict[str, dict[str, int]]:
    """Load every index segment; return segment → {pack: number of chunks it names}."""
    counts: dict[str, dict[str, int]] = {}
    for name, _ in sorted(repo.store.list("index")):
        try:
            blob = repo.store.load(name)
        except ObjectMissing:
            continue  # replaced by compact/repair meanwhile
        try:
            seg = ChunkIndex.from_bytes(repo.codec.open(name.encode(), blob, name), name)
        except IntegrityError as e:
            res.segments[name] = None
            res.problems.append(Problem("index", name, f"index segment damaged: {e}"))
            continue
        res.segments[name] = seg
        c: dict[str, int] = defaultdict(int)
        for _, loc in seg.items():
            c[loc.pack] += 1
        counts[name] = c
    return counts


def _list_packs(repo: Repository, res: RepoCheck, counts: dict[str, dict[str, int]]) -> None:
    for key, size in repo.store.list("packs"):
        name = key.rsplit("/", 1)[-1]
        if not _PACK_NAME.fullmatch(name) or key != pack_key(name):
            res.problems.append(Problem("pack", key, f"{key}: not a pack (unexpected name)"))
            continue
        res.packs[name] = PackInfo(name, size)
    for seg_name, c in counts.items():
        for pack, n in c.items():
            if pack in res.packs:
                res.packs[pack].segments.append(seg_name)
            else:
                res.index_mismatch = True
                res.problems.append(Problem(
                    "index", seg_name,
                    f"{seg_name} names pack {pack[:16]}, which is missing ({n} chunks lost)"))


def _read_toc(repo: Repository, p: PackInfo) -> None:
    try:
        p.toc = read_toc(repo.store.load, p.name, p.size, repo.codec)
    except ObjectMissing:
        p.error = "disappeared while being checked"
    except IntegrityError as e:
        p.error = str(e)


def _verify_pack(repo: Repository, res: RepoCheck, p: PackInfo) -> None:
    """Read the whole pack: its name hash, its TOC, and every chunk in it."""
    try:
        data = repo.store.load(pack_key(p.name))
    except ObjectMissing:
        p.error = "disappeared while being checked"
        return
    errors = []
    if blake3.blake3(data).hexdigest() != p.name:
        errors.append("content does not match its name")
    try:
        p.toc = parse_pack(data, repo.codec)
    except IntegrityError as e:
        errors.append(str(e))
    if errors:
        p.error = "; ".join(errors)
    entries = p.toc if p.toc is not None else res.segment_entries(p.name)
    for ent in entries:
        blob = data[ent.offset : ent.offset + ent.length]
        if len(blob) != ent.length:
            p.bad[ent.id] = "truncated"
            continue
        try:
            plain = repo.codec.open_chunk(ent.id, blob)
        except IntegrityError as err:
            p.bad[ent.id] = str(err)
            continue
        if len(plain) != ent.plain_size:
            p.bad[ent.id] = "size differs from the table of contents"
    res.stats["verified_chunks"] = res.stats.get("verified_chunks", 0) + len(entries)
    res.stats["verified_bytes"] = res.stats.get("verified_bytes", 0) + len(data)


def _compare_segments(res: RepoCheck, p: PackInfo, counts: dict[str, dict[str, int]]) -> None:
    """Each segment naming this pack must agree with its TOC, entry for entry."""
    if p.toc is None:
        return
    for seg_name in p.segments:
        seg = res.segments[seg_name]
        assert seg is not None
        matched = wrong = 0
        for e in p.toc:
            loc = seg.get(e.id)
            if loc is not None and loc.pack == p.name:
                matched += 1
                wrong += (loc.offset, loc.length, loc.plain_size) != (e.offset, e.length,
                                                                        e.plain_size)
        if wrong or matched != counts[seg_name][p.name]:
            res.index_mismatch = True
            res.problems.append(Problem(
                "index", seg_name, f"{seg_name} disagrees with the table of contents of pack "
                f"{p.name[:16]} ({wrong} entries differ, "
                f"{counts[seg_name][p.name] - matched} not in the pack)"))


def _summarise(repo: Repository, res: RepoCheck, verified: set[str]) -> None:
    index = repo.index
    for p in res.packs.values():
        if p.error:
            res.problems.append(Problem("pack", pack_key(p.name), f"pack {p.name[:16]}: {p.error}"))
        if p.bad:
            first = next(iter(p.bad.values()))
            res.problems.append(Problem(
                "pack", pack_key(p.name), f"pack {p.name[:16]}: {len(p.bad)} chunk(s) cannot "
                f"be read ({first})"))
        for cid, why in p.bad.items():
            loc = index.get(cid)
            if loc is not None and loc.pack == p.name:
                res.bad_chunks[cid] = f"damaged in pack {p.name[:16]}: {why}"
        if p.toc is not None and not p.segments:
            res.uncovered.append(p.name)
    if res.uncovered:
        res.notes.append(
            f"{len(res.uncovered)} pack(s) are in no index segment (left by an interrupted "
            "backup, or their index segment was lost); they are read by their table of "
            "contents — 'compact' or 'check --repair' indexes them: "
            + ", ".join(n[:16] for n in sorted(res.uncovered)[:5])
            + (" ..." if len(res.uncovered) > 5 else ""))
    stale = repo.store.temporaries()
    if stale:
        res.notes.append(
            f"{len(stale)} temporary file(s) ({sum(n for _, n in stale)} bytes) left by "
            "interrupted writes: the next backup or 'compact' removes them: "
            + ", ".join(n for n, _ in sorted(stale)[:3]) + (" ..." if len(stale) > 3 else ""))
    res.stats.update({
        "temporaries": len(stale),
        "index_segments": len(res.segments), "packs": len(res.packs),
        "pack_bytes": sum(p.size for p in res.packs.values()), "chunks": len(index),
        "verified_packs": len(verified),
    })
