"""diskvault extract [--stdout] [--sparse] REPO::ARCHIVE [PATH...]"""

from __future__ import annotations

import argparse
import os
import sys

from ..archive.restore import extract_stdout, extract_tree
from ..archive.view import ArchiveView, select_items
from ..errors import UsageError
from .common import READ, Progress, add_common, open_repo, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="restore an archive's items (into the current directory)")
    add_common(p)
    p.add_argument("--stdout", action="store_true",
                   help="write the items' contents, concatenated, to stdout (for | dd of=…)")
    p.add_argument("--sparse", action="store_true",
                   help="write holes for zero runs (files are truncated to full size)")
    p.add_argument("--numeric-ids", action="store_true")
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("-p", "--progress", action="store_true")
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    with open_repo(repo_loc, READ, args.lock_wait) as repo:
        view = ArchiveView.open(repo, name or "")
        items = select_items(view.items, args.paths)
        if args.paths and not items:
            raise UsageError(f"no item of {name!r} matches {' '.join(args.paths)}")
        total = sum(i.size for i in items if i.extents is not None)
        progress = Progress(args.progress, "extract: ")
        if args.stdout:
            sys.stdout.flush()
            extract_stdout(repo, items, sys.stdout.fileno(), args.workers,
                           lambda d: progress(d, total))
        else:
            extract_tree(repo, items, os.getcwd(), sparse=args.sparse, workers=args.workers,
                         numeric_ids=args.numeric_ids, progress=lambda d: progress(d, total))
        progress.done()
    return 0
