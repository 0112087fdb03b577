"""diskvault rename REPO::ARCHIVE NEWNAME"""

from __future__ import annotations

import argparse

from .common import EXCLUSIVE_LOCK, add_common, expand_placeholders, open_repo, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rename", help="rename an archive")
    add_common(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("newname", metavar="NEWNAME")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    # exclusive: the old metadata object is deleted, which a reader may be about to load
    with open_repo(repo_loc, EXCLUSIVE_LOCK, args.lock_wait) as repo:
        repo.rename_archive(name or "", expand_placeholders(args.newname))
    return 0
