"""diskvault check [--verify-data] [--repair] [--archives-only|--repository-only] REPO"""

from __future__ import annotations

import argparse
import json
import sys

from ..archive.check import CheckOptions, CheckReport, run_check
from ..archive.repair import repair
from ..errors import UsageError
from ..repository.lock import EXCLUSIVE, SHARED
from ..repository.repo import Repository
from ..storage.url import open_store
from .common import add_common, passphrase_fn, percent, split_location, warn_unencrypted
from .options import add_progress, make_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check (and repair) the repository and its archives")
    add_common(p)
    p.add_argument("--verify-data", action="store_true",
                   help="read and authenticate every chunk (slow; finds bit rot)")
    p.add_argument("--verify-data-subset", type=percent(0, 100, False, True), metavar="N%",
                   help="like --verify-data, for a random N%% of the packs")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--archives-only", action="store_true")
    only.add_argument("--repository-only", action="store_true")
    p.add_argument("-a", "--glob-archives", metavar="GLOB", help="only archives matching GLOB")
    p.add_argument("--repair", action="store_true",
                   help="rebuild what is damaged (exclusive lock; asks first unless --yes)")
    p.add_argument("--undelete-archives", action="store_true",
                   help="with --repair: list again archives whose metadata is still stored "
                   "but which no manifest names (append-only recovery)")
    p.add_argument("--yes", action="store_true", help="do not ask before repairing")
    p.add_argument("--json", action="store_true")
    add_progress(p)
    p.add_argument("location", metavar="REPO", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    if args.undelete_archives and not args.repair:
        raise UsageError("--undelete-archives needs --repair")
    if args.repair and (args.archives_only or args.repository_only or args.glob_archives):
        raise UsageError("--repair checks everything: drop --archives-only, "
                         "--repository-only and --glob-archives")
    if args.repair and not args.yes:
        _confirm()
    progress = make_progress(args, "check")
    opts = CheckOptions(repository=not args.archives_only, archives=not args.repository_only,
                        verify_data=args.verify_data or args.verify_data_subset is not None,
                        subset=args.verify_data_subset, glob=args.glob_archives,
                        progress=progress)
    out = sys.stderr if args.json else sys.stdout
    repo = Repository.open(open_store(repo_loc), passphrase_fn,
                           lock=EXCLUSIVE if args.repair else SHARED,
                           lock_wait=args.lock_wait, tolerate_damage=True)
    warn_unencrypted(repo)
    try:
        if args.repair:
            report = repair(repo, opts, lambda m: print(f"repair: {m}", file=out, flush=True),
                            undelete=args.undelete_archives)
        else:
            report = run_check(repo, opts)
    finally:
        repo.close()
        if progress:
            progress.done()
    _print(report, args.json)
    return 0 if report.ok else 1


def _confirm() -> None:
    msg = ("check --repair rewrites the index and damaged archives, and moves damaged packs "
           "to quarantine/. Type YES to go on: ")
    if not sys.stdin.isatty():
        raise UsageError("check --repair changes the repository: confirm with --yes")
    sys.stderr.write(msg)
    sys.stderr.flush()
    if sys.stdin.readline().strip() != "YES":
        raise UsageError("repair cancelled")


def _print(report: CheckReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    for p in report.problems:
        print(f"error: {p.message}")
    for n in report.notes:
        print(f"note: {n}")
    s = report.stats
    scope = ", ".join(f"{s[k]} {k.replace('_', ' ')}" for k in
                      ("archives", "items", "packs", "index_segments", "verified_packs")
                      if s.get(k))
    verdict = "no problems found" if report.ok else f"{len(report.problems)} problem(s) found"
    print(f"check: {verdict} ({scope})")
