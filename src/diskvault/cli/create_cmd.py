"""diskvault create [options] REPO::ARCHIVE PATH... | -"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

from ..archive.create import create_archive, refuse_taken_name
from ..errors import UsageError
from ..source.paths import CommandSource, Source, SourceOptions, stdin_source, walk
from ..source.pointintime import PointInTime, walk_at
from . import log
from .common import WRITE, add_common, expand_placeholders, open_repo, split_location
from .options import add_archive_options, create_options, make_progress
from .output import report_archive
from .parent_opts import add_parent_options, apply_parent_options
from .pointintime_opts import (
    add_point_in_time,
    enter_point_in_time,
    point_in_time_options,
    print_notes,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("create", help="create an archive from files, devices or stdin")
    add_common(p)
    p.add_argument("--read-special", action="store_true",
                   help="read block/char devices and FIFOs as content (not as device nodes)")
    p.add_argument("--read-special-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up on a FIFO with no writer after this long (default 300)")
    p.add_argument("--sparse", action="store_true",
                   help="accepted for Borg compatibility: holes are always detected")
    p.add_argument("--stdin-name", default="stdin", metavar="NAME")
    p.add_argument("--stdin-mode", type=lambda s: int(s, 8), default=0o660, metavar="M")
    p.add_argument("--content-from-command", action="store_true",
                   help="store the output of the command given after --")
    p.add_argument("--one-file-system", action="store_true")
    p.add_argument("--skip-unused", action="store_true",
                   help="files and devices holding a known filesystem (ext2/3/4, NTFS, FAT, "
                   "XFS, swap...): do not read or store its free blocks (restored as zeros)")
    add_archive_options(p)
    add_parent_options(p)
    add_point_in_time(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, archive = split_location(args.location, need_archive=True)
    name = expand_placeholders(archive or "")
    if args.content_from_command:
        if not args.paths:
            raise UsageError("--content-from-command needs a command after --")
    elif not args.paths:
        raise UsageError("nothing to back up: give PATHs or - for stdin")
    progress = make_progress(args, "create")
    opts = create_options(args, progress)
    pit_opts = point_in_time_options(args)
    files = [] if args.content_from_command else [p for p in args.paths if p != "-"]
    if (pit_opts.snapshot or pit_opts.fsfreeze) and not files:
        raise UsageError("--snapshot and --fsfreeze need PATHs to back up")
    warnings: list[str] = []
    with open_repo(repo_loc, WRITE, args.lock_wait) as repo:
        refuse_taken_name(repo, name)  # before the parent is loaded or a byte is read
        apply_parent_options(args, repo, opts, _source_id(args))
        with contextlib.ExitStack() as stack:
            pit = enter_point_in_time(stack, pit_opts, files, repo_loc, repo, name, opts)
            meta, _ = create_archive(repo, name, _warn(_sources(args, pit), warnings), opts)
        if progress:
            progress.done(int(meta["stats"]["original"]))
        if pit is not None:
            print_notes(pit.notes)
        report_archive(repo, meta, args.json, args.stats)
    if pit is not None:
        pit.finish()  # a failed --post-command: exit 1, after the output
    return 1 if warnings else 0


def _warn(sources: Iterator[Source], warnings: list[str]) -> Iterator[Source]:
    """Say what a source needs said as it is opened, before its content is read."""
    for src in sources:
        if src.warning:
            log.warning(src.warning)
            warnings.append(src.warning)
        yield src


def _source_id(args: argparse.Namespace) -> list[str]:
    """What this archive backs up, to find its default parent: the absolute paths."""
    if args.content_from_command:
        return ["command:" + " ".join(args.paths)]
    return sorted(f"stdin:{args.stdin_name}" if p == "-" else os.path.abspath(p)
                  for p in args.paths)


def _sources(args: argparse.Namespace, pit: PointInTime | None) -> Iterator[Source]:
    if args.content_from_command:
        yield CommandSource(args.paths, args.stdin_name, args.stdin_mode).source
        return
    sopts = SourceOptions(read_special=args.read_special,
                          read_special_timeout=args.read_special_timeout,
                          one_file_system=args.one_file_system,
                          skip_unused=args.skip_unused)
    for p in args.paths:
        if p == "-":
            yield stdin_source(args.stdin_name, args.stdin_mode)
        elif pit is not None and pit.path(p) != p:
            yield from walk_at(p, pit.path(p), sopts)
        else:
            yield from walk([p], sopts)
