"""diskvault info [--json] REPO[::ARCHIVE]"""

from __future__ import annotations

import argparse
import json

from ..archive.model import Item
from ..archive.view import ArchiveView
from ..errors import IntegrityError
from ..storage.url import mask
from .common import READ, add_common, fmt_size, fmt_time, open_repo, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="sizes of the repository or of one archive")
    add_common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("location", metavar="REPO[::ARCHIVE]", nargs="?")
    p.set_defaults(func=run)


def repo_summary(repo) -> dict:
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
    return {"location": repo.store.location, "id": repo.id.hex(), "encryption": repo.encryption,
            "append_only": repo.append_only, "archives": len(repo.manifest.archives),
            "unreadable_archives": unreadable,
            "original_size": original, "unique_chunks": chunks, "unique_size": plain,
            "stored_size": stored}


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=None)
    with open_repo(repo_loc, READ, args.lock_wait) as repo:
        summary = repo_summary(repo)
        if name is None:
            if args.json:
                print(json.dumps({"repository": summary}, indent=2))
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
        m, s = view.meta, view.meta.get("stats", {})
        items = [{"path": i.path, "size": i.size, "source": i.source, "fs": i.fs,
                  "partition": i.partition, "disk_offset": i.disk_offset, "note": i.note,
                  **(i.stats or {})} for i in view.items if i.extents is not None]
        info = {"name": name, "id": view.ref.id.hex(), "hostname": m.get("hostname"),
                "username": m.get("username"), "start": m.get("time"), "end": m.get("time_end"),
                # masked again: archives made before masking may hold S3 secrets
                "command_line": [mask(str(a)) for a in m.get("command_line") or []],
                "comment": m.get("comment"),
                "compression": m.get("compression"), "chunker": m.get("chunker"),
                "stats": s, "items": items, "disk": m.get("disk")}
        if args.json:
            print(json.dumps({"archive": info, "repository": summary}, indent=2, default=str))
            return 0
        dur = (m.get("time_end", 0) - m.get("time", 0))
        print(f"Archive name: {name}\nArchive fingerprint: {info['id']}\n"
              f"Hostname: {info['hostname']}\nUsername: {info['username']}\n"
              f"Time (start): {fmt_time(m.get('time', 0))}\n"
              f"Time (end): {fmt_time(m.get('time_end', 0))}\nDuration: {dur:.2f} s\n"
              f"Command line: {' '.join(info['command_line'] or [])}\n"
              f"Compression: {info['compression']}, chunker: {info['chunker']}\n"
              f"Number of items: {m.get('nitems')}\n"
              f"Original size: {fmt_size(s.get('original', 0))}\n"
              f"Read: {fmt_size(s.get('read', 0))}\n"
              f"Zero (not stored): {fmt_size(s.get('zero', 0))}\n"
              f"Unused filesystem space (not read): {fmt_size(s.get('unused', 0))}\n"
              f"Deduplicated: {fmt_size(s.get('dedup', 0))}\n"
              f"Stored by this archive: {fmt_size(s.get('new_stored', 0))} "
              f"({s.get('new_chunks', 0)} new chunks)")
        if info["disk"]:
            print(format_disk(info["disk"]))
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
