"""diskvault delete [-a GLOB] [--dry-run] [--list] REPO[::ARCHIVE] [ARCHIVE...]"""

from __future__ import annotations

import argparse

from ..archive.check import select_archives
from ..errors import ArchiveNotFound, UsageError, Warning_
from .common import EXCLUSIVE_LOCK, READ, add_common, open_repo, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("delete", help="delete archives (space is freed by 'compact')")
    add_common(p)
    p.add_argument("-a", "--glob-archives", metavar="GLOB",
                   help="delete every archive whose name matches GLOB (give REPO only)")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="print which archives would be deleted; delete nothing")
    p.add_argument("--list", action="store_true", help="print each deleted archive")
    p.add_argument("location", metavar="REPO[::ARCHIVE]", nargs="?")
    p.add_argument("more", nargs="*", metavar="ARCHIVE", help="more archives to delete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.glob_archives is not None:
        repo_loc, name = split_location(args.location, need_archive=None)
        if name is not None or args.more:
            raise UsageError("-a/--glob-archives selects the archives: give REPO, not "
                             "archive names")
    else:
        repo_loc, name = split_location(args.location, need_archive=True)
    # exclusive, like prune and compact: no create or restore sees an archive vanish
    mode = READ if args.dry_run else EXCLUSIVE_LOCK
    with open_repo(repo_loc, mode, args.lock_wait) as repo:
        if args.glob_archives is not None:
            names = [r.name for r in select_archives(repo, args.glob_archives)]
        else:
            names = [name or "", *args.more]
            for n in names:  # all named archives exist, or nothing is deleted
                if n not in repo.manifest.archives:
                    raise ArchiveNotFound(n)
        for n in names:
            if args.dry_run:
                print(f"Would delete archive: {n}")
            elif args.list:
                print(f"Deleting archive: {n}")
        if names and not args.dry_run:
            repo.delete_archives(names)
    if not names:
        raise Warning_(f"no archive matches {args.glob_archives!r}: nothing deleted")
    return 0
