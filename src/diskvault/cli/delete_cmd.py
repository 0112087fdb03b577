"""diskvault delete REPO::ARCHIVE [ARCHIVE...]"""

from __future__ import annotations

import argparse

from .common import EXCLUSIVE_LOCK, add_common, open_repo, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("delete", help="delete archives (space is freed by 'compact')")
    add_common(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("more", nargs="*", metavar="ARCHIVE", help="more archives to delete")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    # exclusive, like prune and compact: no create or restore sees an archive vanish
    with open_repo(repo_loc, EXCLUSIVE_LOCK, args.lock_wait) as repo:
        repo.delete_archives([name or "", *args.more])
    return 0
