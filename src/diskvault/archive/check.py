"""Checking archives against the repository: which items, which byte ranges are damaged.

Builds on the repository check (repository/check.py), which says which chunks are
missing or damaged; here every archive's metadata and item stream are read and every
data extent is looked up, so a problem is reported as the archive, the item path and
the byte range a restore could not produce. An item stream with unreadable chunks is
read around the gap (``read_items_robust``) so the other items are still checked.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from ..errors import IntegrityError, UnsupportedVersion
from ..repository.check import Problem, ProgressFn, RepoCheck, check_repository
from ..repository.manifest import ArchiveRef
from ..repository.repo import Repository
from ..source.content import DATA
from .create import ARCHIVE_VERSION
from .delta import Delta, Fingerprinter, materialize
from .items import MAX_META_CHUNK
from .model import Item

# an item's msgpack map starts with its first field, "path" (Item.to_dict order)
_PATH_KEY = b"\xa4path"


@dataclass
class CheckOptions:
    repository: bool = True
    archives: bool = True
    verify_data: bool = False
    subset: float | None = None  # verify this fraction of the packs
    glob: str | None = None  # only archives matching this (fnmatch) pattern
    progress: ProgressFn | None = None


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    repo_check: RepoCheck | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": [p.to_dict() for p in self.problems],
                "notes": self.notes, "stats": self.stats}


def run_check(repo: Repository, opts: CheckOptions) -> CheckReport:
    report = CheckReport()
    bad: dict[bytes, str] = {}
    if opts.repository:
        rc = check_repository(repo, opts.verify_data, opts.subset, opts.progress)
        report.repo_check, bad = rc, rc.bad_chunks
        report.problems += rc.problems
        report.notes += rc.notes
        report.stats.update(rc.stats)
    elif repo.manifest_problem:
        report.problems.append(Problem("manifest", "manifest", repo.manifest_problem[1]))
    if opts.archives:
        # with --archives-only, --verify-data reads each referenced chunk instead of packs
        direct = opts.verify_data and not opts.repository
        check_archives(repo, report, bad, opts.glob, direct, verify_deltas=opts.verify_data)
    return report


def select_archives(repo: Repository, glob: str | None) -> list[ArchiveRef]:
    refs = repo.manifest.sorted_archives()
    return [r for r in refs if glob is None or fnmatch.fnmatchcase(r.name, glob)]


def load_meta(repo: Repository, ref: ArchiveRef) -> dict:
    meta = repo.load_archive(ref)  # a dict whose "items" (if any) is a list of ids
    version = meta.get("version")
    if type(version) is not int:
        raise IntegrityError(f"archive {ref.name!r}: metadata is malformed")
    if version != ARCHIVE_VERSION:
        raise UnsupportedVersion(f"archive {ref.name!r}", version, ARCHIVE_VERSION)
    meta.setdefault("items", [])
    return meta


def check_archives(repo: Repository, report: CheckReport, bad: dict[bytes, str],
                   glob: str | None = None, verify_direct: bool = False,
                   verify_deltas: bool = False) -> None:
    state = ChunkState(repo, bad, verify_direct, verify_deltas)
    n_items = 0
    refs = select_archives(repo, glob)
    for ref in refs:
        try:
            meta = load_meta(repo, ref)
        except (IntegrityError, UnsupportedVersion) as e:
            report.problems.append(Problem("archive", ref.name, f"{e}", archive=ref.name))
            continue
        items, lost = read_items_robust(meta["items"], repo.get_chunk)
        for i, why in lost:
            report.problems.append(Problem(
                "archive", ref.name, f"archive {ref.name!r}: item metadata chunk {i + 1} of "
                f"{len(meta['items'])} cannot be read ({why}): the items in it cannot be "
                "listed or restored", archive=ref.name))
        repaired = meta.get("repaired")
        for r in repaired if isinstance(repaired, list) else []:
            lost_n = r.get("lost_item_chunks") if isinstance(r, dict) else "?"
            report.problems.append(Problem(
                "archive", ref.name, f"archive {ref.name!r}: a repair lost {lost_n} chunk(s) "
                "of its item metadata: the items in them are gone", archive=ref.name))
        for item in items:
            n_items += 1
            _check_item(ref.name, item, state, report)
    if glob is None and not repo.manifest_problem:
        known = {r.id.hex() for r in repo.manifest.archives.values()}
        stray = [n for n, _ in repo.store.list("archives") if n.rsplit("/", 1)[-1] not in known]
        if stray:
            report.notes.append(
                f"{len(stray)} archive metadata object(s) are in no manifest (left by an "
                "interrupted create or delete): 'compact' removes them, 'check --repair "
                "--undelete-archives' lists them as archives again")
    report.stats.update({"archives": len(refs), "items": n_items})


def _check_item(archive: str, item: Item, state: ChunkState, report: CheckReport) -> None:
    if item.extents is None:
        return
    try:
        ranges = damaged_ranges(item, state)
        total = item.extents.total()
    except IntegrityError as e:
        report.problems.append(Problem("item", archive, f"archive {archive!r}: {item.path}: {e}",
                                       archive=archive, path=item.path))
        return
    if ranges:
        report.problems.append(Problem("item", archive, f"archive {archive!r}: {item.path}: "
                                       + describe_ranges(ranges), archive=archive,
                                       path=item.path, ranges=ranges))
    elif item.health:
        report.notes.append(f"archive {archive!r}: {item.path}: healed (every chunk is "
                            "present again); 'check --repair' clears its damage mark")
    if total != item.size:
        report.problems.append(Problem(
            "item", archive, f"archive {archive!r}: {item.path}: extents cover {total} "
            f"bytes, the item has {item.size}", archive=archive, path=item.path))


class ChunkState:
    """Why a data chunk cannot be restored, or None. ``verify_direct``: read it to know.
    ``verify_deltas``: rebuild each delta extent and compare its full-content id."""

    def __init__(self, repo: Repository, bad: dict[bytes, str], verify_direct: bool,
                 verify_deltas: bool = False) -> None:
        self.repo, self.bad, self.verify_direct = repo, bad, verify_direct
        self.verify_deltas = verify_deltas
        self._verified: dict[bytes, str | None] = {}
        self._fp: Fingerprinter | None = None

    def delta(self, length: int, delta: Delta) -> str | None:
        """Why a delta extent cannot be restored (its base, a patch, or the rebuilt
        content not matching its full-content id), or None."""
        why = self(delta.base, length)
        for p in delta.patches:
            why = why or self(p, None)
        if why or not self.verify_deltas:
            return why
        if self._fp is None:
            self._fp = Fingerprinter(self.repo.key.id_key)
        try:
            data = materialize(length, delta, self.repo.get_chunk)
        except IntegrityError:
            return "damaged"
        if self._fp.full_id(self._fp.blocks(data), length) != delta.full:
            return "damaged"
        return None

    def __call__(self, cid: bytes, length: int | None) -> str | None:
        loc = self.repo.index.get(cid)
        if loc is None:
            return "missing"
        if cid in self.bad or (length is not None and loc.plain_size != length):
            return "damaged"
        if self.verify_direct:
            if cid not in self._verified:
                try:
                    self.repo.get_chunk(cid)
                    self._verified[cid] = None
                except IntegrityError:
                    self._verified[cid] = "damaged"
            return self._verified[cid]
        return None


def damaged_ranges(item: Item, state: ChunkState) -> list[list]:
    """``[[first, last, why, chunk id hex], ...]`` (inclusive byte offsets in the item);
    a delta extent is named by its full-content id."""
    out, off = [], 0
    for kind, length, cid, delta in item.extents.records() if item.extents else ():
        if delta is not None:
            why = state.delta(length, delta)
            if why:
                out.append([off, off + length - 1, why, delta.full.hex()])
        elif kind == DATA and cid is not None:
            why = state(cid, length)
            if why:
                out.append([off, off + length - 1, why, cid.hex()])
        off += length
    return out


def describe_ranges(ranges: list[list], show: int = 4) -> str:
    merged: list[list] = []
    for first, last, why, _ in ranges:
        if merged and merged[-1][1] + 1 == first and merged[-1][2] == why:
            merged[-1][1] = last
        else:
            merged.append([first, last, why])
    parts = [f"bytes {a}-{b} {why}" for a, b, why in merged[:show]]
    if len(merged) > show:
        parts.append(f"and {len(merged) - show} more range(s)")
    lost = sum(b - a + 1 for a, b, *_ in ranges)
    return ", ".join(parts) + f": {lost} bytes cannot be restored"


# --- item streams with holes ----------------------------------------------------------


def read_items_robust(chunk_ids: list[bytes], get_chunk: Callable[[bytes], bytes]
                      ) -> tuple[list[Item], list[tuple[int, str]]]:
    """The items of an item stream, reading around chunks that cannot be fetched.

    Returns (items, [(chunk number, why), ...]). After a gap, parsing resumes at the
    next byte that starts an item map (its first key is "path") and decodes as an item.
    """
    runs: list[tuple[int, bytearray]] = []  # (first chunk number, bytes) of unbroken runs
    lost: list[tuple[int, str]] = []
    cur: bytearray | None = None
    for i, cid in enumerate(chunk_ids):
        try:
            data = get_chunk(cid)
            if len(data) > MAX_META_CHUNK:  # never written so: runs are joined below
                raise IntegrityError(f"{len(data)} bytes, more than any item metadata chunk")
        except IntegrityError as e:
            lost.append((i, str(e)))
            cur = None
            continue
        if cur is None:
            cur = bytearray()
            runs.append((i, cur))
        cur += data
    items: list[Item] = []
    for first, run in runs:
        items += _parse_run(bytes(run), resync=first != 0)
    return items, lost


def _parse_run(data: bytes, resync: bool) -> list[Item]:
    items: list[Item] = []
    pos = _next_item(data, 0) if resync else 0
    while pos is not None and pos < len(data):
        got, end = _unpack_from(data, pos)
        items += got
        if end >= len(data) or not got:
            break
        pos = _next_item(data, end + 1)  # the stream is broken at ``end``: resync
    return items


def _unpack_from(data: bytes, pos: int, limit: int | None = None) -> tuple[list[Item], int]:
    """Items decoded from ``pos`` (at most ``limit``) until the data stops making sense;
    returns them and the offset after the last one."""
    u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    u.feed(data[pos:])
    items: list[Item] = []
    end = pos
    try:
        for obj in u:
            if not isinstance(obj, dict):
                break
            items.append(Item.from_dict(obj))
            end = pos + u.tell()
            if limit is not None and len(items) >= limit:
                break
    except (ValueError, TypeError, msgpack.UnpackException, IntegrityError):
        pass  # TypeError: an unhashable map key
    return items, end


def _next_item(data: bytes, start: int) -> int | None:
    k = data.find(_PATH_KEY, start)
    while k >= 0:
        # the map header just before the key: fixmap (1 byte) or map16 (0xde + 2 bytes)
        for head, is_map in ((k - 1, k >= 1 and 0x80 <= data[k - 1] <= 0x8F),
                             (k - 3, k >= 3 and data[k - 3] == 0xDE)):
            if head >= start and is_map and _unpack_from(data, head, limit=1)[0]:
                return head
        k = data.find(_PATH_KEY, k + 1)
    return None
