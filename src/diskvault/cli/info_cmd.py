"""diskvault info [--json] REPO[::ARCHIVE]"""

from __future__ import annotations

import argparse
import json

from ..archive.model import Item
from ..archive.view import ArchiveView
from ..errors import IntegrityError
from ..storage.url import mask
from .common import READ, add_common, open_repo, split_location
from .output import (
    archive_json,
    cache_json,
    encryption_json,
    fmt_size,
    repository_json,
    stats_lines,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="sizes of the repository or of one archive")
    add_common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("location", metavar="REPO[::ARCHIVE]", nargs="?")
    p.set_defaults(func=run)


def repo_summary(repo) -> dict:
    """diskvault's repository figures (extra keys of Borg's ``repository`` object)."""
    plain = stored = chunks = 0
    for _, loc in repo.index.items():
        chunks += 1
        plain += loc.plain_size
        stored += loc.length
    original = unreadable = 0
    for ref in repo.manifest.sorted_archives():
        try:
            stats = repo.load_archive(ref).get("stats")
            original += int(stats.get("original", 0)) if isinstance(stats, dict) else 0
        except IntegrityError:  # a damaged archive must not hide the rest: check names it
            unreadable += 1
    return {**repository_json(repo), "encryption": repo.encryption,
            "archives": len(repo.manifest.archives), "unreadable_archives": unreadable,
            "original_size": original, "unique_chunks": chunks, "unique_size": plain,
            "stored_size": stored}


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=None)
    with open_repo(repo_loc, READ, args.lock_wait) as repo:
        summary = repo_summary(repo)
        if name is None:
            if args.json:
                print(json.dumps({"repository": summary, "encryption": encryption_json(repo),
                                  "cache": cache_json(repo)}, indent=2))
                return 0
            print(f"Repository: {summary['location']}\nRepository ID: {summary['id']}\n"
                  f"Encryption: {summary['encryption']}"
                  f"{' (append-only)' if summary['append_only'] else ''}\n"
                  f"Archives: {summary['archives']}"
                  + (f" ({summary['unreadable_archives']} damaged: run 'check')"
                     if summary["unreadable_archives"] else "") + "\n"
                  f"All archives, original size: {fmt_size(summary['original_size'])}\n"
                  f"Unique chunks: {summary['unique_chunks']}, "
                  f"{fmt_size(summary['unique_size'])} → stored "
                  f"{fmt_size(summary['stored_size'])}")
            return 0
        view = ArchiveView.open(repo, name)
        m, archive_id = view.meta, view.ref.id.hex()
        if args.json:
            items = [{"path": i.path, "size": i.size, "source": i.source, "fs": i.fs,
                      "partition": i.partition, "disk_offset": i.disk_offset, "note": i.note,
                      **(i.stats or {})} for i in view.items if i.extents is not None]
            info = {**archive_json(repo, m, lambda: view.items, archive_id),
                    "chunker": m.get("chunker"), "items": items, "disk": m.get("disk")}
            # Borg's key is "archives"; "archive" stays for diskvault's earlier scripts
            print(json.dumps({"archives": [info], "archive": info, "repository": summary,
                              "encryption": encryption_json(repo), "cache": cache_json(repo)},
                             indent=2, default=str))
            return 0
        lines = stats_lines(m, archive_id)
        lines[2:2] = [f"Hostname: {m.get('hostname')}", f"Username: {m.get('username')}",
                      # masked again: archives made before masking may hold S3 secrets
                      "Command line: "
                      + " ".join(mask(str(a)) for a in m.get("command_line") or []),
                      f"Comment: {m.get('comment') or ''}",
                      f"Compression: {m.get('compression')}, chunker: {m.get('chunker')}"]
        print("\n".join(lines))
        if m.get("disk"):
            print(format_disk(m["disk"]))
        for line in format_disk_items(view.items):
            print(line)
    return 0


def format_disk(disk: dict) -> str:
    ident = ", ".join(f"{k} {disk[k]}" for k in ("serial", "model", "wwid") if disk.get(k))
    return (f"Disk: {disk.get('path')} ({disk.get('kind')}{', ' + ident if ident else ''}), "
            f"{fmt_size(disk.get('size', 0))}, {disk.get('sector_size')}-byte sectors, "
            f"table {disk.get('label') or 'none'}"
            + (f" (id {disk['disk_id']})" if disk.get("disk_id") else "")
            + f", {len(disk.get('partitions', []))} partitions")


def format_disk_items(items: list[Item]) -> list[str]:
    """Per-partition figures of a disk archive; table structures and gaps summed up.

    Items that are neither (plain archives) are shown when a filesystem was found on
    them (``create --skip-unused``); other items are not worth a line each.
    """
    lines, rest, n_rest, noted = [], dict.fromkeys(_FIGURES, 0), 0, []
    for i in items:
        if i.extents is None:
            continue
        if i.partition is None and not i.fs and i.source in ("table", "gap"):
            n_rest += 1
            rest["total"] += i.size
            for k in _FIGURES[1:]:
                rest[k] += (i.stats or {}).get(k, 0)
            if i.note:  # large unpartitioned gaps: stored or not (--keep-unpartitioned)
                noted.append(f"      {i.path} ({fmt_size(i.size)}): {i.note}")
            continue
        if i.partition is None and not i.fs and i.source != "disk":
            continue
        figures = {"total": i.size, **{k: (i.stats or {}).get(k) for k in _FIGURES[1:]}}
        lines.append(f"  {i.path} ({i.fs or 'no known filesystem'}): " + _figures(figures)
                     + (f"\n      note: {i.note}" if i.note else ""))
    if n_rest:
        lines.append(f"  partition table and gaps ({n_rest} items): " + _figures(rest))
        lines += noted
    return lines


_FIGURES = ("total", "read", "unused", "zero", "dedup", "stored")
_LABELS = {"total": "total", "read": "read", "unused": "skipped as unused", "zero": "zero",
           "dedup": "dedup", "stored": "stored"}


def _figures(f: dict) -> str:
    """Only figures the archive recorded: plain `create` keeps no per-item "stored"."""
    return ", ".join(f"{_LABELS[k]} {fmt_size(f[k])}" for k in _FIGURES if f.get(k) is not None)
