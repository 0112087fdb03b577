"""diskvault disk backup [--serial S | DEVICE | IMAGE] REPO::ARCHIVE  (and disk restore)

One archive per disk: the partition table, every partition (free filesystem blocks are
neither read nor stored) and the gaps between them, in disk order. `disk list` shows
serials; `--serial` pins the disk down the way the seed's /dev/disk/by-id glob does, but
refuses to guess when no disk or several disks match.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ..archive.create import CreateOptions
from ..archive.disk import DiskBackupResult, DiskSource, backup_disk, plan_backup
from ..chunking.base import ChunkerParams
from ..errors import ArchiveExists, UsageError, Warning_
from ..repository.compression import Compression
from ..source.disks import find_by_serial
from ..source.pointintime import PointInTime
from .common import (
    WRITE,
    Progress,
    add_common,
    add_upload_connections,
    expand_placeholders,
    open_repo,
    split_location,
)
from .create_cmd import print_stats
from .info_cmd import format_disk_items
from .pointintime_opts import (
    add_point_in_time,
    point_in_time_options,
    print_notes,
    protected_paths,
)


def register_disk(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="back up a whole disk: table, partitions (used blocks only), gaps",
        description="Back up a whole disk or disk image into one archive: one item per "
        "table structure, partition and gap, in disk order, so that `extract --stdout "
        "REPO::ARCHIVE | dd of=DISK` gives the disk back (free filesystem blocks as zeros) "
        "and `disk restore` can restore the disk or one partition.")
    add_common(p)
    p.add_argument("--serial", metavar="SERIAL",
                   help="the disk with this serial (or WWID; see `diskvault disk list`)")
    p.add_argument("--no-skip-unused", dest="skip_unused", action="store_false",
                   help="read and store free filesystem blocks too (default: skip them)")
    p.add_argument("--keep-unpartitioned", action="store_true",
                   help="store unallocated space after the first partition too (default: "
                   "gaps larger than 1 MiB are not stored and restore as zeros)")
    p.add_argument("--chunker-params", type=ChunkerParams.parse, default=None,
                   metavar="PARAMS", help="fixed,SIZE[,HEADER] (default fixed,4194304) or "
                   "fastcdc,MIN,AVG,MAX")
    p.add_argument("-C", "--compression", type=Compression.parse,
                   default=Compression.parse("lz4"), metavar="SPEC",
                   help="none, lz4 (default), zstd[,L], auto,C[,L]")
    p.add_argument("--comment", default="")
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    add_upload_connections(p)
    add_point_in_time(p)
    p.add_argument("-n", "--dry-run", action="store_true", help="read and count, store nothing")
    p.add_argument("-p", "--progress", action="store_true")
    p.add_argument("-s", "--stats", action="store_true",
                   help="print statistics, per partition too")
    p.add_argument("--json", action="store_true")
    p.add_argument("device", nargs="?", metavar="DEVICE|IMAGE")
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.set_defaults(func=run)


def source_path(args: argparse.Namespace) -> str:
    if args.serial is not None and args.device:
        raise UsageError("give either --serial or a DEVICE/IMAGE, not both")
    if args.serial is not None:
        return find_by_serial(args.serial).path
    if not args.device:
        raise UsageError("which disk? give --serial SERIAL or a DEVICE/IMAGE")
    return str(args.device)


def run(args: argparse.Namespace) -> int:
    repo_loc, archive = split_location(args.location, need_archive=True)
    name = expand_placeholders(archive or "")
    path = source_path(args)
    progress = Progress(args.progress, "") if args.progress else None
    opts = CreateOptions(compression=args.compression, chunker=args.chunker_params,
                         workers=args.workers, dry_run=args.dry_run, comment=args.comment,
                         upload_threads=args.upload_connections,
                         progress=progress)
    pit_opts = point_in_time_options(args)
    pit = None
    with contextlib.ExitStack() as stack:
        repo = None
        if pit_opts.active:
            # the repository first: an existing name must stop us before a pre-command
            repo = stack.enter_context(open_repo(repo_loc, WRITE, args.lock_wait))
            if name in repo.manifest.archives:
                raise ArchiveExists(name)
            # taken before the disk is opened: the table and block maps are read from
            # the point in time too
            pit = stack.enter_context(PointInTime(pit_opts, [path], protected_paths(repo_loc)))
            opts.before_commit = pit.check
        src = DiskSource.open(pit.path(path) if pit else path)
        src.path = path  # the archive names the disk, not its snapshot
        try:
            plan = plan_backup(src, skip_unused=args.skip_unused,
                               keep_unpartitioned=args.keep_unpartitioned)
            for w in plan.warnings:  # before the long read, so the user can still stop it
                sys.stderr.write(f"diskvault: warning: {w}\n")
            with (contextlib.nullcontext(repo) if repo is not None
                  else open_repo(repo_loc, WRITE, args.lock_wait)) as r:
                result = backup_disk(r, name, plan, opts)
        finally:
            src.close()
    if progress:
        progress.done()
    if pit is not None:
        print_notes(pit.notes)
    _report(args, name, result)
    if pit is not None:
        pit.finish()
    if result.warnings:
        raise Warning_(f"{len(result.warnings)} warning(s): the backup of {path} is not "
                       "crash-consistent")
    return 0


def _report(args: argparse.Namespace, name: str, r: DiskBackupResult) -> None:
    if args.json:
        items = [{"path": i.path, "source": i.source, "disk_offset": i.disk_offset,
                  "size": i.size, "partition": i.partition, "fs": i.fs, "note": i.note,
                  **(i.stats or {})} for i in r.items]
        print(json.dumps({"archive": {"name": name, "stats": r.stats.to_dict(),
                                      "start": r.meta["time"], "end": r.meta["time_end"],
                                      "disk": r.meta["disk"], "items": items},
                          "warnings": r.warnings, "dry_run": args.dry_run}, indent=2))
    elif args.stats:
        print_stats(name, r.stats, sys.stdout)
        for line in format_disk_items(r.items):
            print(line)
