"""diskvault list [--format FMT] [--json] [--short] REPO[::ARCHIVE]"""

from __future__ import annotations

import argparse
import json
import stat
import string
import sys

from ..archive.view import ArchiveView, select_items
from ..errors import UsageError
from .common import READ, add_common, open_repo, report_warnings, split_location
from .output import encryption_json, fmt_time, iso_time, repository_json

ARCHIVE_FORMAT = "{archive:<40} {time} [{id}]{NL}"
ITEM_FORMAT = "{mode} {user:6} {group:6} {size:>12} {mtime} {path}{NL}"
ARCHIVE_KEYS = {"archive", "name", "barchive", "time", "start", "end", "id", "hostname",
                "username", "comment", "NL", "TAB", "CR", "NUL"}
ITEM_KEYS = {"path", "type", "mode", "size", "mtime", "user", "group", "uid", "gid",
             "num_chunks", "source", "fs", "target", "NL", "TAB", "CR", "NUL"}
SPECIAL = {"NL": "\n", "TAB": "\t", "CR": "\r", "NUL": "\0"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list archives, or the items of one archive")
    add_common(p)
    p.add_argument("--format", metavar="FMT", help="e.g. '{archive}{NL}' or '{path}{NL}'")
    p.add_argument("--json", action="store_true",
                   help="archives: one JSON document like Borg's; items: JSON lines")
    p.add_argument("--json-lines", action="store_true",
                   help="items: one JSON object per line (Borg's list --json-lines)")
    p.add_argument("--short", action="store_true", help="names/paths only")
    p.add_argument("location", metavar="REPO[::ARCHIVE]", nargs="?")
    p.add_argument("paths", nargs="*", metavar="PATTERN",
                   help="only items matching: a path (and what is below it) or a glob, "
                   "as for extract")
    p.set_defaults(func=run)


def check_format(fmt: str, keys: set[str]) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
    except ValueError as e:
        raise UsageError(f"invalid --format {fmt!r}: {e}") from None
    for f in fields:
        if f.split(".")[0].split("[")[0] not in keys:
            raise UsageError(f"invalid --format key {{{f}}}: use one of "
                             + ", ".join(sorted(k for k in keys if k not in SPECIAL)))


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=None)
    out = sys.stdout
    if args.format:
        check_format(args.format, ITEM_KEYS if name else ARCHIVE_KEYS)
    with open_repo(repo_loc, READ, args.lock_wait) as repo:
        if name is None:
            rows = [archive_row(repo, ref) for ref in repo.manifest.sorted_archives()]
            if args.json or args.json_lines:
                doc = {"archives": [_json_archive(r) for r in rows],
                       "repository": repository_json(repo), "encryption": encryption_json(repo)}
                print(json.dumps(doc, indent=2))
                return 0
            fmt = "{archive}{NL}" if args.short else (args.format or ARCHIVE_FORMAT)
            for r in rows:
                out.write(fmt.format(**r, **SPECIAL))
            return 0
        view = ArchiveView.open(repo, name)
        unmatched: list[str] = []
        items = select_items(view.items, args.paths, unmatched)
        if args.json or args.json_lines:
            for i in items:
                print(json.dumps(_json_item(i)))
        else:
            fmt = "{path}{NL}" if args.short else (args.format or ITEM_FORMAT)
            for i in items:
                out.write(fmt.format(**item_row(i), **SPECIAL))
        loss = view.loss  # a listing without the lost items is not the archive's
    out.flush()
    return report_warnings([f"pattern {p!r} matched no item" for p in unmatched]
                           + ([loss] if loss else []))


def _json_archive(row: dict) -> dict:
    """Borg's keys (``time`` in ISO 8601 like ``start``) and diskvault's."""
    return {**row, "time": row["start"]}


def _json_item(i) -> dict:
    """Borg's item keys (mtime in ISO 8601, ``healthy``, ``linktarget``, ``flags``: diskvault
    stores no BSD flags) and diskvault's (``source``: where the content came from)."""
    return {**item_row(i), "mtime": iso_time(i.mtime / 1e9) if i.mtime else "",
            "healthy": i.health is None, "linktarget": i.target or "", "flags": 0}


def archive_row(repo, ref) -> dict:
    # list must stay cheap: host and user come from the archive metadata (one small read)
    meta = repo.load_archive(ref)
    return {
        "archive": ref.name, "name": ref.name, "barchive": ref.name,
        "time": fmt_time(ref.time), "start": iso_time(meta.get("time", ref.time)),
        "end": iso_time(meta.get("time_end", ref.time)), "id": ref.id.hex(),
        "hostname": meta.get("hostname", ""), "username": meta.get("username", ""),
        "comment": meta.get("comment", ""),
    }


def item_row(i) -> dict:
    return {
        "path": i.path, "type": i.type, "mode": stat.filemode(i.mode), "size": i.size,
        "mtime": fmt_time(i.mtime / 1e9) if i.mtime else "", "user": i.user or str(i.uid),
        "group": i.group or str(i.gid), "uid": i.uid, "gid": i.gid,
        "num_chunks": i.extents.num_chunks() if i.extents is not None else 0,
        "source": i.source or "", "fs": i.fs or "", "target": i.target or "",
    }
