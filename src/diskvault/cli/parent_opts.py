"""--parent / --no-parent / --changed-extents for `create` and `disk backup`."""

from __future__ import annotations

import argparse

from ..archive.create import CreateOptions
from ..archive.parent import ChangedRanges, ParentArchive, find_parent
from ..errors import UsageError
from ..repository.repo import Repository
from . import log


def add_parent_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--parent", metavar="ARCHIVE",
                   help="compare with this archive and store changed windows as deltas "
                   "(default: the newest archive of this host with the same source)")
    g.add_argument("--no-parent", action="store_true",
                   help="store every changed window whole (no delta extents)")
    p.add_argument("--changed-extents", metavar="FILE",
                   help="JSON {\"size\": N, \"parent\": ARCHIVE, \"extents\": [[offset, "
                   "length], ...]}: only these byte ranges changed since ARCHIVE; the rest "
                   "is taken from it without being read (needs --parent ARCHIVE)")


def apply_parent_options(args: argparse.Namespace, repo: Repository, opts: CreateOptions,
                         source_id: object, size: int | None = None) -> None:
    """Set ``opts.parent``/``opts.changed``/``opts.source_id``; refuse a wrong list before
    anything is read. ``size``: the disk's size (`disk backup`)."""
    opts.source_id = source_id
    changed = ChangedRanges.load(args.changed_extents) if args.changed_extents else None
    if changed is not None and not args.parent:
        raise UsageError("--changed-extents needs --parent ARCHIVE (the archive the list "
                         "is relative to)")
    if repo.format_version < 2:
        if args.parent or changed is not None:
            if changed is not None:
                raise UsageError("--changed-extents needs a format version 2 repository")
            log.note("delta extents need a format version 2 repository; storing changed "
                     "windows whole")
        return
    if args.no_parent:
        return
    name = args.parent or find_parent(repo, source_id)
    if name is None:
        return
    if name not in repo.manifest.archives:
        raise UsageError(f"--parent: no archive {name!r}")
    if changed is not None:
        if size is not None:
            changed.check(size, name, "the disk")
        elif changed.parent != name:
            changed.check(changed.size, name, "")
    opts.parent = ParentArchive.load(repo, name)
    opts.changed = changed
