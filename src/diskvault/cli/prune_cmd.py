"""diskvault prune --keep-* [-a GLOB] [--dry-run] [--list] REPO"""

from __future__ import annotations

import argparse
import fnmatch
import json

from ..archive.prune import PERIODS, parse_interval, plan_prune
from ..errors import AppendOnlyError
from .common import EXCLUSIVE_LOCK, READ, add_common, open_repo, split_location
from .output import fmt_time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="delete archives not kept by the retention rules "
                       "(space is freed by 'compact')")
    add_common(p)
    p.add_argument("--keep-within", metavar="INTERVAL",
                   help="keep every archive younger than INTERVAL (e.g. 12H, 7d, 2w, 6m, 1y)")
    p.add_argument("--keep-last", "--keep-secondly", dest="secondly", type=int, metavar="N",
                   help="keep the last N archives")
    for rule in list(PERIODS)[1:]:
        p.add_argument(f"--keep-{rule}", dest=rule, type=int, metavar="N",
                       help=f"keep the newest archive of each of the last N {rule} periods")
    p.add_argument("-a", "--glob-archives", metavar="GLOB",
                   help="only consider archives matching GLOB (one host/disk series)")
    p.add_argument("-n", "--dry-run", action="store_true", help="change nothing")
    p.add_argument("--list", action="store_true", help="show each archive and the rule that "
                   "kept it")
    p.add_argument("--json", action="store_true")
    p.add_argument("location", metavar="REPO", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    keep = {rule: getattr(args, rule) for rule in PERIODS if getattr(args, rule) is not None}
    within = parse_interval(args.keep_within) if args.keep_within else None
    with open_repo(repo_loc, READ if args.dry_run else EXCLUSIVE_LOCK, args.lock_wait) as repo:
        if repo.append_only and not args.dry_run:
            raise AppendOnlyError("prune")
        refs = [r for r in repo.manifest.sorted_archives()
                if args.glob_archives is None or fnmatch.fnmatchcase(r.name, args.glob_archives)]
        decisions = plan_prune(refs, keep, within)
        doomed = [d.ref.name for d in decisions if not d.keep]
        if doomed and not args.dry_run:
            repo.delete_archives(doomed)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "archives": [
            {"name": d.ref.name, "id": d.ref.id.hex(), "time": d.ref.time, "keep": d.keep,
             "rule": d.rule, "number": d.number or None} for d in decisions]}, indent=2))
    elif args.list:
        n = 0
        for d in decisions:
            if d.keep:
                label = f"Keeping archive (rule: {d.rule} #{d.number}):"
            elif args.dry_run:
                label = "Would prune:"
            else:
                n += 1
                label = f"Pruning archive ({n}/{len(doomed)}):"
            print(f"{label:<40} {d.ref.name:<40} {fmt_time(d.ref.time)} [{d.ref.id.hex()}]")
    return 0
