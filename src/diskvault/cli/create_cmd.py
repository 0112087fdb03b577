"""diskvault create [options] REPO::ARCHIVE PATH... | -"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator

from ..archive.create import CreateOptions, CreateStats, create_archive
from ..chunking.base import ChunkerParams
from ..errors import ArchiveExists, UsageError
from ..repository.compression import Compression
from ..source.paths import CommandSource, Source, SourceOptions, stdin_source, walk
from ..source.pointintime import PointInTime, walk_at
from .common import (
    WRITE,
    Progress,
    add_common,
    add_upload_connections,
    expand_placeholders,
    fmt_size,
    open_repo,
    split_location,
)
from .pointintime_opts import (
    add_point_in_time,
    point_in_time_options,
    print_notes,
    protected_paths,
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
    p.add_argument("--chunker-params", type=ChunkerParams.parse, default=None,
                   metavar="PARAMS", help="fixed,SIZE[,HEADER] or fastcdc,MIN,AVG,MAX "
                   "(default: fixed,4194304 for files/devices, fastcdc,524288,2097152,8388608 "
                   "for streams)")
    p.add_argument("-C", "--compression", type=Compression.parse, default=Compression.parse("lz4"),
                   metavar="SPEC", help="none, lz4 (default), zstd[,L], auto,C[,L]")
    p.add_argument("--stdin-name", default="stdin", metavar="NAME")
    p.add_argument("--stdin-mode", type=lambda s: int(s, 8), default=0o660, metavar="M")
    p.add_argument("--content-from-command", action="store_true",
                   help="store the output of the command given after --")
    p.add_argument("--one-file-system", action="store_true")
    p.add_argument("--skip-unused", action="store_true",
                   help="files and devices holding a known filesystem (ext2/3/4, NTFS, FAT, "
                   "XFS, swap...): do not read or store its free blocks (restored as zeros)")
    p.add_argument("--comment", default="")
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    add_upload_connections(p)
    add_point_in_time(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="read and count, store nothing")
    p.add_argument("-p", "--progress", action="store_true")
    p.add_argument("-s", "--stats", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, archive = split_location(args.location, need_archive=True)
    assert archive is not None
    name = expand_placeholders(archive)
    if args.content_from_command:
        if not args.paths:
            raise UsageError("--content-from-command needs a command after --")
    elif not args.paths:
        raise UsageError("nothing to back up: give PATHs or - for stdin")
    opts = CreateOptions(compression=args.compression, chunker=args.chunker_params,
                         workers=args.workers, dry_run=args.dry_run, comment=args.comment,
                         upload_threads=args.upload_connections,
                         progress=Progress(args.progress, "") if args.progress else None)
    sopts = SourceOptions(read_special=args.read_special,
                          read_special_timeout=args.read_special_timeout,
                          one_file_system=args.one_file_system,
                          skip_unused=args.skip_unused)
    pit_opts = point_in_time_options(args)
    files = [] if args.content_from_command else [p for p in args.paths if p != "-"]
    if (pit_opts.snapshot or pit_opts.fsfreeze) and not files:
        raise UsageError("--snapshot and --fsfreeze need PATHs to back up")
    pit = None
    with open_repo(repo_loc, WRITE, args.lock_wait) as repo:
        if name in repo.manifest.archives:  # before a command starts or a byte is read
            raise ArchiveExists(name)
        warnings: list[str] = []
        with contextlib.ExitStack() as stack:
            if pit_opts.active:
                pit = stack.enter_context(
                    PointInTime(pit_opts, files, protected_paths(repo_loc)))
                opts.before_commit = pit.check
            if args.content_from_command:
                sources = iter([CommandSource(args.paths, args.stdin_name,
                                              args.stdin_mode).source])
            else:
                sources = _warn(_sources(args, sopts, pit), warnings)
            meta, stats = create_archive(repo, name, sources, opts)
    if pit is not None:
        print_notes(pit.notes)
    if opts.progress:
        opts.progress.done()  # type: ignore[attr-defined]
    if args.json:
        print(json.dumps({"archive": {"name": name, "stats": stats.to_dict(),
                                      "start": meta["time"], "end": meta["time_end"]},
                          "dry_run": args.dry_run}, indent=2))
    elif args.stats:
        print_stats(name, stats, sys.stdout)
    if pit is not None:
        pit.finish()  # a failed --post-command: exit 1, after the output
    return 1 if warnings else 0


def _warn(sources: Iterator[Source], warnings: list[str]) -> Iterator[Source]:
    """Say what a source needs said as it is opened, before its content is read."""
    for src in sources:
        if src.warning:
            sys.stderr.write(f"diskvault: warning: {src.warning}\n")
            warnings.append(src.warning)
        yield src


def _sources(args: argparse.Namespace, sopts: SourceOptions, pit: PointInTime | None):
    for p in args.paths:
        if p == "-":
            yield stdin_source(args.stdin_name, args.stdin_mode)
        elif pit is not None and pit.path(p) != p:
            yield from walk_at(p, pit.path(p), sopts)
        else:
            yield from walk([p], sopts)


def print_stats(name: str, s: CreateStats, out) -> None:
    rate = s.original / s.seconds if s.seconds else 0
    lines = [
        f"Archive name: {name}",
        f"Duration: {s.seconds:.2f} s ({fmt_size(rate)}/s)",
        f"Number of items: {s.items}",
        f"Original size: {fmt_size(s.original)}",
        f"Read: {fmt_size(s.read)}",
        f"Zero (not stored): {fmt_size(s.zero)} (of which holes, not read: {fmt_size(s.holes)})",
        f"Unused filesystem space (not read): {fmt_size(s.unused)}",
        f"Deduplicated (already stored): {fmt_size(s.dedup)}",
        f"New chunks: {s.new_chunks}, {fmt_size(s.new_plain)} → stored "
        f"{fmt_size(s.new_stored)} compressed and encrypted",
    ]
    out.write("\n".join(lines) + "\n")
