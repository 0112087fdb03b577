"""diskvault key export [--paper] REPO [FILE] | key import REPO FILE | key change-passphrase REPO"""

from __future__ import annotations

import argparse
import os
import sys

from ..crypto.passphrase import get_replacement_passphrase
from ..errors import UsageError
from ..repository.keymanage import (
    change_passphrase,
    export_text,
    genuine_key_blob,
    import_key,
)
from ..repository.lock import SHARED, Lock
from ..storage.url import open_store
from .common import WRITE, add_common, open_repo, passphrase_fn, split_location


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("key", help="export, import, or change the passphrase of the key")
    keys = p.add_subparsers(dest="key_command", metavar="ACTION", parser_class=type(p))
    keys.required = True
    e = keys.add_parser("export", help="write the (passphrase-protected) key to FILE or stdout")
    add_common(e)
    e.add_argument("--paper", action="store_true",
                   help="short hex lines with a checksum each, to print and type back in")
    e.add_argument("location", metavar="REPO")
    e.add_argument("file", metavar="FILE", nargs="?")
    e.set_defaults(func=run_export)
    i = keys.add_parser("import", help="restore the key from an export (text or paper)")
    add_common(i)
    i.add_argument("location", metavar="REPO")
    i.add_argument("file", metavar="FILE", help="the export, or - for stdin")
    i.set_defaults(func=run_import)
    c = keys.add_parser("change-passphrase",
                        help="protect the key with a new passphrase (DISKVAULT_NEW_PASSPHRASE "
                        "or a prompt)")
    add_common(c)
    c.add_argument("location", metavar="REPO")
    c.set_defaults(func=run_change)


def run_export(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    # the key is exported as stored (wrapped: no secret is revealed); the passphrase is
    # asked for only when the key is not the one this client last saw open the repository
    with open_store(repo_loc) as store:
        repo_id, blob = genuine_key_blob(store, passphrase_fn)
    text = export_text(blob, repo_id, args.paper)
    if args.file and args.file != "-":
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def run_import(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file) as f:
                text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {args.file}: {e.strerror}") from None
    store = open_store(repo_loc)
    with Lock(store, SHARED, args.lock_wait):
        where = import_key(store, text, passphrase_fn)
    print(f"key imported: {where}")
    return 0


def run_change(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    with open_repo(repo_loc, WRITE, args.lock_wait) as repo:
        if repo.encryption == "none":
            raise UsageError("this repository is not encrypted: it has no passphrase")
        where = change_passphrase(repo, get_replacement_passphrase())
    print(f"passphrase changed: {where}")
    return 0
