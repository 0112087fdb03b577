"""diskvault init -e {none,repokey,keyfile} REPO"""

from __future__ import annotations

import argparse

from ..repository.repo import DEFAULT_PACK_SIZE, Repository
from ..storage.url import open_store
from .common import parse_size, passphrase_fn, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a new, empty repository")
    p.add_argument("-e", "--encryption", required=True, choices=["none", "repokey", "keyfile"],
                   help="repokey: key in the repository, keyfile: key in "
                        "$DISKVAULT_KEYS_DIR; both protected by a passphrase")
    p.add_argument("--append-only", action="store_true",
                   help="nothing can ever be deleted or overwritten through this repository")
    p.add_argument("--pack-size", type=parse_size, default=DEFAULT_PACK_SIZE,
                   help=argparse.SUPPRESS)  # tests use tiny packs
    p.add_argument("location", metavar="REPO", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    store = open_store(repo_loc)
    repo = Repository.init(store, args.encryption, passphrase_fn,
                           append_only=args.append_only, pack_size=args.pack_size)
    repo.close()
    if args.encryption == "keyfile":
        from ..repository.repo import keyfile_path

        print(f"Key file written to {keyfile_path(repo.id)} — keep a copy "
              "('diskvault key export'): without it the backups cannot be read.")
    return 0
