"""diskvault init -e {none,repokey,keyfile} REPO"""

from __future__ import annotations

import argparse

from ..repository.repo import DEFAULT_PACK_SIZE, Repository, keyfile_path
from ..storage.url import mask, open_store
from .common import add_rsh, parse_size, passphrase_fn, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a new, empty repository")
    p.add_argument("-e", "--encryption", required=True, choices=["none", "repokey", "keyfile"],
                   help="repokey: key in the repository, keyfile: key in "
                        "$DISKVAULT_KEYS_DIR; both protected by a passphrase")
    p.add_argument("--append-only", action="store_true",
                   help="nothing can ever be deleted or overwritten through this repository")
    p.add_argument("--pack-size", type=parse_size, default=DEFAULT_PACK_SIZE,
                   help=argparse.SUPPRESS)  # tests use tiny packs
    add_rsh(p)
    p.add_argument("location", metavar="REPO", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    store = open_store(repo_loc)
    repo = Repository.init(store, args.encryption, passphrase_fn,
                           append_only=args.append_only, pack_size=args.pack_size)
    repo.close()
    print(key_backup_advice(args.encryption, mask(repo_loc), keyfile_path(repo.id)))
    return 0


def key_backup_advice(encryption: str, location: str, keyfile: str) -> str:
    """What init tells the user about keeping the key (Borg users expect it)."""
    if encryption == "none":
        return (f"Repository {location} created, not encrypted: whoever can read its "
                "storage can read the backups.")
    where = (f"The key is in the key file {keyfile}" if encryption == "keyfile"
             else "The key is stored in the repository")
    lost = ("if this computer is lost" if encryption == "keyfile"
            else "if the repository's key object is damaged")
    return (f"{where}, protected by your passphrase. Keep a copy of it away from the "
            f"repository: diskvault key export {location} FILE (or --paper to print it). "
            f"Without the key and the passphrase nobody can read the backups, you neither: "
            f"{lost}, the copy and the passphrase are the only way back.")
