"""diskvault config REPO [KEY [VALUE]] — show or change repository settings"""

from __future__ import annotations

import argparse

from ..errors import AppendOnlyError, UsageError
from .common import EXCLUSIVE_LOCK, READ, add_common, open_repo, split_location

SETTABLE = {"append_only"}
SHOWN = ("version", "encryption", "append_only", "pack_size")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or change repository settings (append_only)")
    add_common(p)
    p.add_argument("--allow-disable-append-only", action="store_true",
                   help="needed to set append_only to 0: a deliberate step, never by accident "
                   "or by a backup client (see docs/reliability.md)")
    p.add_argument("location", metavar="REPO")
    p.add_argument("key", metavar="KEY", nargs="?")
    p.add_argument("value", metavar="VALUE", nargs="?")
    p.set_defaults(func=run)


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise UsageError(f"invalid value {s!r}: use 1 or 0")


def _shown(v: object) -> object:
    return int(v) if isinstance(v, bool) else v


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    if args.key is not None and args.key not in SHOWN:
        raise UsageError(f"unknown setting {args.key!r}: one of {', '.join(SHOWN)}")
    if args.value is None:
        with open_repo(repo_loc, READ, args.lock_wait) as repo:
            if args.key:
                print(_shown(repo.config.get(args.key)))
            else:
                for k in SHOWN:
                    print(f"{k} = {_shown(repo.config.get(k))}")
        return 0
    if args.key not in SETTABLE:
        raise UsageError(f"{args.key} cannot be changed")
    value = _bool(args.value)
    with open_repo(repo_loc, EXCLUSIVE_LOCK, args.lock_wait) as repo:
        if repo.append_only and not value and not args.allow_disable_append_only:
            raise AppendOnlyError("turning append-only off without --allow-disable-append-only")
        if bool(repo.config.get("append_only", False)) != value:
            repo.set_config("append_only", value)
    return 0
