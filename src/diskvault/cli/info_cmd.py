"""diskvault info [--json] REPO[::ARCHIVE]"""

from __future__ import annotations

import argparse
import json

from ..archive.view import ArchiveView
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
    original = 0
    for ref in repo.manifest.sorted_archives():
        original += int(repo.load_archive(ref).get("stats", {}).get("original", 0))
    return {"location": repo.store.location, "id": repo.id.hex(), "encryption": repo.encryption,
            "append_only": repo.append_only, "archives": len(repo.manifest.archives),
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
                  f"Archives: {summary['archives']}\n"
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
                "command_line": m.get("command_line"), "comment": m.get("comment"),
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
        for it in items:
            if it.get("partition") is not None or it.get("fs"):
                print(f"  {it['path']}: {fmt_size(it['size'])}, fs {it.get('fs') or '-'}, "
                      f"read {fmt_size(it.get('read', 0))}, "
                      f"unused {fmt_size(it.get('unused', 0))}, "
                      f"zero {fmt_size(it.get('zero', 0))}"
                      + (f" ({it['note']})" if it.get("note") else ""))
    return 0
