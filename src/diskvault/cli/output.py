"""What commands print: one size format, one statistics block, the JSON documents.

The JSON documents carry the keys Borg 1.2/1.4 print (borgmatic, Vorta and scripts
parse them: ``repository``, ``encryption``, ``cache.stats``, ``archive(s)`` with
``original_size``/``compressed_size``/``deduplicated_size``/``nfiles``), and
diskvault's own figures (read, zero, unused, ...) as extra keys next to them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import datetime

from ..archive.model import DATA, Item
from ..archive.view import ArchiveView
from ..errors import IntegrityError, UnsupportedVersion
from ..repository.repo import Repository, keyfile_path
from ..storage.url import mask

_DECIMAL = ("B", "kB", "MB", "GB", "TB", "PB")
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_size(n: float, binary: bool = False) -> str:
    """``1.23 MB`` like Borg's statistics; ``binary``: ``4.0 MiB`` like lsblk (disk list)."""
    base, units = (1024, _BINARY) if binary else (1000, _DECIMAL)
    if abs(n) < base:
        return f"{n:.0f} B"
    for unit in units[1:]:
        n /= base
        if abs(n) < base or unit == units[-1]:
            return f"{n:.1f} {unit}" if binary else f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%a, %Y-%m-%d %H:%M:%S")


def iso_time(ts: float) -> str:
    """Borg's JSON time format: local time, ISO 8601, microseconds, no zone."""
    return datetime.fromtimestamp(ts).isoformat(timespec="microseconds")


# --- the statistics block (create --stats, disk backup --stats, info REPO::ARCHIVE) ----

def stats_lines(meta: dict, archive_id: str | None) -> list[str]:
    """One archive's figures, from its metadata (``time``, ``time_end``, ``stats``)."""
    s = meta.get("stats", {})
    seconds = float(s.get("seconds") or (meta.get("time_end", 0) - meta.get("time", 0)))
    rate = s.get("original", 0) / seconds if seconds > 0 else 0
    lines = [f"Archive name: {meta.get('name')}"]
    if archive_id:
        lines.append(f"Archive fingerprint: {archive_id}")
    lines += [
        f"Time (start): {fmt_time(meta.get('time', 0))}",
        f"Time (end): {fmt_time(meta.get('time_end', 0))}",
        f"Duration: {seconds:.2f} s ({fmt_size(rate)}/s)",
        f"Number of items: {meta.get('nitems', s.get('items', 0))}",
        f"Original size: {fmt_size(s.get('original', 0))}",
        f"Read: {fmt_size(s.get('read', 0))}",
        f"Zero (not stored): {fmt_size(s.get('zero', 0))} "
        f"(of which holes, not read: {fmt_size(s.get('holes', 0))})",
        f"Unused filesystem space (not read): {fmt_size(s.get('unused', 0))}",
        f"Deduplicated (already stored): {fmt_size(s.get('dedup', 0))}",
        f"Stored by this archive: {s.get('new_chunks', 0)} new chunks, "
        f"{fmt_size(s.get('new_plain', 0))} → {fmt_size(s.get('new_stored', 0))} "
        "compressed and encrypted",
    ]
    if meta.get("parent"):
        lines.append(f"Parent: {meta['parent']}; stored as deltas: {fmt_size(s.get('delta', 0))}"
                     f" of windows, {s.get('delta_blocks', 0)} changed 4 KiB blocks; taken from "
                     f"the parent unread: {fmt_size(s.get('parent', 0))}")
    if s.get("fingerprints"):
        lines.append(f"Block fingerprints stored: {fmt_size(s['fingerprints'])}")
    return lines


# --- JSON ------------------------------------------------------------------------------

def chunk_refs(items: Iterable[Item]) -> Iterable[tuple[bytes, int]]:
    """(chunk id, plain length) of every data extent, duplicates included."""
    for i in items:
        if i.extents is not None:
            for kind, length, cid in i.extents:
                if kind == DATA and cid is not None:
                    yield cid, length


def compressed_size(repo: Repository, items: Iterable[Item]) -> int:
    """Stored bytes of every chunk the items reference, duplicates counted (Borg's csize).

    A chunk not in the index (a dry run's new chunks) counts with its plain size.
    """
    total = 0
    for cid, length in chunk_refs(items):
        loc = repo.index.get(cid)
        total += loc.length if loc is not None else length
    return total


def archive_stats_json(repo: Repository, meta: dict, items: Callable[[], list[Item]]
                       ) -> dict:
    """Borg's four archive figures, then diskvault's own (``original``, ``read``, ...).

    ``items`` is called only for an archive made before its compressed size was
    recorded."""
    s: dict = dict(meta.get("stats", {}))
    # archives of older versions lack the compressed size: count it now
    csize = int(s["compressed"]) if "compressed" in s else compressed_size(repo, items())
    return {"original_size": int(s.get("original", 0)), "compressed_size": csize,
            "deduplicated_size": int(s.get("new_stored", 0)),
            "nfiles": int(meta.get("nitems", s.get("items", 0))), **s}


def archive_json(repo: Repository, meta: dict, items: Callable[[], list[Item]],
                 archive_id: str | None) -> dict:
    start, end = float(meta.get("time", 0)), float(meta.get("time_end", 0))
    chunker = meta.get("chunker")
    return {
        "name": meta.get("name"), "id": archive_id or "", "start": iso_time(start),
        "end": iso_time(end), "duration": max(0.0, end - start),
        "hostname": meta.get("hostname", ""), "username": meta.get("username", ""),
        "comment": meta.get("comment", ""),
        # masked again: archives made before masking may hold S3 secrets
        "command_line": [mask(str(a)) for a in meta.get("command_line") or []],
        # Borg's form: ["buzhash", 19, 23, 21, 4095] → ["fixed", 4194304]
        "chunker_params": [int(p) if p.isdigit() else p for p in str(chunker).split(",")]
        if chunker else [],
        "compression": meta.get("compression"),
        "stats": archive_stats_json(repo, meta, items),
    }


def repository_json(repo: Repository) -> dict:
    return {"id": repo.id.hex(), "location": repo.store.location,
            "last_modified": iso_time(repo.manifest.time or 0),
            "format_version": repo.format_version, "append_only": repo.append_only}


def encryption_json(repo: Repository) -> dict:
    d: dict = {"mode": repo.encryption}
    if repo.encryption == "keyfile":
        d["keyfile"] = keyfile_path(repo.id)
    return d


def cache_json(repo: Repository) -> dict:
    """Borg's ``cache.stats``: chunk totals over all archives (duplicates counted) and
    over the repository's unique chunks (from the index).

    The totals come from each archive's recorded figures; archives made before those
    were recorded have their items read once here.
    """
    total_chunks = total_size = total_csize = 0
    for ref in repo.manifest.sorted_archives():
        try:
            meta = repo.load_archive(ref)
            s = meta.get("stats", {})
            if "chunks" in s and "compressed" in s:
                total_chunks += int(s["chunks"])
                total_csize += int(s["compressed"])
                total_size += int(s["original"]) - int(s["zero"]) - int(s["unused"])
                continue
            items = ArchiveView.open(repo, ref.name).items
        except (IntegrityError, UnsupportedVersion):
            continue  # a damaged archive must not hide the rest: check names it
        for cid, length in chunk_refs(items):
            total_chunks += 1
            total_size += length
            loc = repo.index.get(cid)
            total_csize += loc.length if loc is not None else 0
    unique_chunks = unique_size = unique_csize = 0
    for _, loc in repo.index.items():
        unique_chunks += 1
        unique_size += loc.plain_size
        unique_csize += loc.length
    return {"stats": {"total_chunks": total_chunks, "total_csize": total_csize,
                      "total_size": total_size, "total_unique_chunks": unique_chunks,
                      "unique_csize": unique_csize, "unique_size": unique_size}}


def report_archive(repo: Repository, meta: dict, as_json: bool, stats: bool,
                   extra_json: dict | None = None,
                   extra_lines: Iterable[str] = ()) -> None:
    """What create and disk backup print: Borg's ``create --json`` document, or with
    ``--stats`` the statistics block; nothing otherwise (like Borg)."""
    ref = repo.manifest.archives.get(str(meta.get("name")))
    archive_id = ref.id.hex() if ref is not None else None
    if as_json:
        doc = {"repository": repository_json(repo), "encryption": encryption_json(repo),
               "cache": cache_json(repo),
               # a new archive records its compressed size: no items needed
               "archive": {**archive_json(repo, meta, lambda: [], archive_id),
                           **(extra_json or {})},
               "dry_run": archive_id is None}
        print(json.dumps(doc, indent=2, default=str))
    elif stats:
        print("\n".join([*stats_lines(meta, archive_id), *extra_lines]))
