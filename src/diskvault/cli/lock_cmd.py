"""diskvault break-lock REPO — remove the locks of processes that are gone"""

from __future__ import annotations

import argparse

from ..repository.lock import break_locks
from ..repository.repo import Repository
from ..storage.url import open_store
from .common import add_rsh, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("break-lock", help="remove all repository locks (only when the "
                       "processes holding them are gone)")
    add_rsh(p)
    p.add_argument("location", metavar="REPO", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    store = open_store(repo_loc)
    Repository.read_config(store)  # refuse anything that is not a repository
    for rec in break_locks(store):
        print(f"removed {rec.get('kind', '?')} lock of pid {rec.get('pid', '?')} on "
              f"{rec.get('host', '?')} ({rec['name']})")
    return 0
