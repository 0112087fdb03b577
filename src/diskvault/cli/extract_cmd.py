"""diskvault extract [--stdout] [--sparse] [--devices] [--continue-on-error] REPO::ARCHIVE
[PATTERN...]"""

from __future__ import annotations

import argparse
import os
import sys

from ..archive.extract import Damage, damage_lines
from ..archive.file_extract import extract_files, files_paths
from ..archive.restore import extract_stdout, extract_tree
from ..archive.view import ArchiveView, select_items
from ..errors import UsageError
from .common import READ, add_common, open_repo, report_warnings, split_location
from .options import add_restore_options, make_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="restore an archive's items (into the current directory)")
    add_common(p)
    p.add_argument("--stdout", action="store_true",
                   help="write the items' contents, concatenated, to stdout (for | dd of=…)")
    p.add_argument("--sparse", action="store_true",
                   help="write holes for zero runs (files are truncated to full size)")
    p.add_argument("--numeric-ids", action="store_true",
                   help="restore owners by uid/gid only, not by user/group name")
    p.add_argument("--devices", action="store_true",
                   help="create block and character device nodes (without it they are "
                   "skipped with a warning)")
    add_restore_options(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("paths", nargs="*", metavar="PATTERN",
                   help="a path (with everything below it) or a glob: *, ?, [...], **; "
                   "Borg's sh:, fm:, re:, pp: prefixes work too")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    with open_repo(repo_loc, READ, args.lock_wait) as repo:
        view = ArchiveView.open(repo, name or "")
        # before a byte is written: what a repair lost cannot be restored, and the rest
        # alone (above all concatenated on stdout) is not the archive
        loss = view.require_complete(args.continue_on_error)
        # paths inside a filesystem of an item (disk/part2.files/etc/fstab) go to TSK
        inside = files_paths({i.path for i in view.items}, args.paths)
        paths = [p for p in args.paths if p not in inside]
        unmatched: list[str] = []
        items = select_items(view.items, paths, unmatched)
        if paths and not items:  # checked before anything is written
            raise UsageError(f"no item of {name!r} matches {' '.join(paths)}")
        if inside:
            sys.stdout.flush()
            extract_files(repo, name or "", inside, os.getcwd(),
                          sys.stdout.fileno() if args.stdout else None)
            if not paths:
                return report_warnings([loss] if loss else [])
        warnings = [f"pattern {p!r} matched no item" for p in unmatched]
        warnings += [loss] if loss else []
        damage: list[Damage] | None = [] if args.continue_on_error else None
        total = sum(i.size for i in items if i.extents is not None)
        progress = make_progress(args, "extract")

        def report(done: int) -> None:
            if progress:
                progress(done, total)
        if args.stdout:
            sys.stdout.flush()
            extract_stdout(repo, items, sys.stdout.fileno(), args.workers,
                           report, damage=damage)
        else:
            skipped = extract_tree(repo, items, os.getcwd(), sparse=args.sparse,
                                   workers=args.workers, numeric_ids=args.numeric_ids,
                                   progress=report, devices=args.devices, damage=damage)
            if skipped:
                warnings.append(f"{len(skipped)} device node(s) not created ({skipped[0]}"
                                f"{', …' if len(skipped) > 1 else ''}): --devices creates them")
        if progress:
            progress.done()
    warnings += damage_lines(damage or [])
    return report_warnings(warnings)

