"""diskvault compact [--threshold N%] [--dry-run] REPO"""

from __future__ import annotations

import argparse
import json

from ..archive.refs import referenced_chunks
from ..errors import AppendOnlyError
from ..repository.compact import compact
from .common import EXCLUSIVE_LOCK, READ, add_common, open_repo, percent, split_location
from .output import fmt_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="free the space of deleted archives")
    add_common(p)
    p.add_argument("--threshold", type=percent(0, 100, True, False), default=0.10, metavar="N%",
                   help="repack packs with more than N%% unused space (default 10%%)")
    p.add_argument("-n", "--dry-run", action="store_true", help="only say what would be freed")
    p.add_argument("--json", action="store_true")
    p.add_argument("location", metavar="REPO", nargs="?")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, _ = split_location(args.location, need_archive=False)
    with open_repo(repo_loc, READ if args.dry_run else EXCLUSIVE_LOCK, args.lock_wait) as repo:
        if repo.append_only:
            raise AppendOnlyError("compact")
        refs = referenced_chunks(repo)
        ids = {r.id for r in repo.manifest.archives.values()}
        st = compact(repo, refs, ids, args.threshold, dry_run=args.dry_run,
                     log=lambda m: print(f"compact: {m}"))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **st.to_dict()}, indent=2))
        return 0
    verb = "would free" if args.dry_run else "freed"
    print(f"compact: {verb} {fmt_size(st.bytes_freed)} ({st.packs_deleted} unused pack(s) "
          f"deleted, {st.packs_repacked} repacked into {st.packs_written}, "
          f"{st.segments_replaced} index segment(s) merged, {st.archive_meta_deleted} stray "
          f"archive metadata object(s) removed)")
    if st.missing_referenced:
        print(f"compact: note: {st.missing_referenced} chunk(s) archives refer to are missing "
              "(run 'check')")
    return 0
