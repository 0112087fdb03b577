"""diskvault disk backup [--serial S] REPO::ARCHIVE [DEVICE | IMAGE]  (and disk restore)

One archive per disk: the partition table, every partition (free filesystem blocks are
neither read nor stored) and the gaps between them, in disk order. `disk list` shows
serials; `--serial` pins the disk down the way the seed's /dev/disk/by-id glob does, but
refuses to guess when no disk or several disks match.
"""

from __future__ import annotations

import argparse
import contextlib

from ..archive.disk import DiskSource, backup_disk, plan_backup
from ..errors import UsageError, Warning_
from ..source.disks import find_by_serial
from . import log
from .common import WRITE, add_common, expand_placeholders, open_repo, split_location
from .info_cmd import format_disk_items
from .options import add_archive_options, create_options, make_progress
from .output import report_archive
from .parent_opts import add_parent_options, apply_parent_options
from .pointintime_opts import (
    add_point_in_time,
    enter_point_in_time,
    point_in_time_options,
    print_notes,
)


def register_disk(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup", help="back up a whole disk: table, partitions (used blocks only), gaps",
        usage="%(prog)s [options] REPO::ARCHIVE [DEVICE | IMAGE]",
        description="Back up a whole disk or disk image into one archive: one item per "
        "table structure, partition and gap, in disk order, so that `extract --stdout "
        "REPO::ARCHIVE | dd of=DISK` gives the disk back (free filesystem blocks as zeros) "
        "and `disk restore` can restore the disk or one partition.")
    add_common(p)
    p.add_argument("--serial", metavar="SERIAL",
                   help="the disk with this serial (or WWID; see `diskvault disk list`)")
    p.add_argument("--image-format", metavar="FMT",
                   help="read IMAGE as this format (qcow2, vmdk, vhdx, ...; raw = the file's "
                   "own bytes); default: VM images are detected and read as the guest's disk")
    p.add_argument("--no-skip-unused", dest="skip_unused", action="store_false",
                   help="read and store free filesystem blocks too (default: skip them)")
    p.add_argument("--keep-unpartitioned", action="store_true",
                   help="store unallocated space after the first partition too (default: "
                   "gaps larger than 1 MiB are not stored and restore as zeros)")
    add_archive_options(p, stats_help="print statistics, per partition too")
    add_parent_options(p)
    add_point_in_time(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("device", nargs="?", metavar="DEVICE|IMAGE")
    p.set_defaults(func=run)


def location_and_device(args: argparse.Namespace) -> tuple[str, str | None]:
    """``REPO::ARCHIVE [DEVICE]``, as in create; the old ``DEVICE REPO::ARCHIVE`` order
    still works, with a warning. The location is the argument that names an archive."""
    first, second = args.location, args.device
    if second is not None and "::" not in first and "::" in second:
        log.warning("`disk backup DEVICE REPO::ARCHIVE` is deprecated: write "
                    "`disk backup REPO::ARCHIVE DEVICE`, like create")
        return second, first
    return first, second


def source_path(serial: str | None, device: str | None) -> str:
    if serial is not None and device:
        raise UsageError("give either --serial or a DEVICE/IMAGE, not both")
    if serial is not None:
        return find_by_serial(serial).path
    if not device:
        raise UsageError("which disk? give --serial SERIAL or a DEVICE/IMAGE")
    return device


def run(args: argparse.Namespace) -> int:
    location, device = location_and_device(args)
    repo_loc, archive = split_location(location, need_archive=True)
    name = expand_placeholders(archive or "")
    path = source_path(args.serial, device)
    progress = make_progress(args, "disk backup")
    opts = create_options(args, progress)
    pit_opts = point_in_time_options(args)
    with open_repo(repo_loc, WRITE, args.lock_wait) as repo:
        with contextlib.ExitStack() as stack:
            # taken before the disk is opened: the table and block maps are read from the
            # point in time too
            pit = enter_point_in_time(stack, pit_opts, [path], repo_loc, repo, name, opts)
            src = DiskSource.open(pit.path(path) if pit else path, args.image_format)
            src.path = path  # the archive names the disk, not its snapshot
            try:
                plan = plan_backup(src, skip_unused=args.skip_unused,
                                   keep_unpartitioned=args.keep_unpartitioned)
                for w in plan.warnings:  # before the long read, so the user can still stop it
                    log.warning(w)
                apply_parent_options(args, repo, opts, _source_id(plan.disk_meta()),
                                     plan.source.size)
                result = backup_disk(repo, name, plan, opts)
            finally:
                src.close()
        # the point in time is over (thawed, snapshot gone): now print
        if progress:
            progress.done(result.stats.original)
        if pit is not None:
            print_notes(pit.notes)
        items = [{"path": i.path, "source": i.source, "disk_offset": i.disk_offset,
                  "size": i.size, "partition": i.partition, "fs": i.fs, "note": i.note,
                  **(i.stats or {})} for i in result.items]
        report_archive(repo, result.meta, args.json, args.stats,
                       extra_json={"disk": result.meta["disk"], "items": items,
                                   "warnings": result.warnings},
                       extra_lines=format_disk_items(result.items))
    if pit is not None:
        pit.finish()  # a failed --post-command: exit 1, after the output
    if result.warnings:
        raise Warning_(f"{len(result.warnings)} warning(s): the backup of {path} is not "
                       "crash-consistent")
    return 0


def _source_id(disk: dict) -> dict:
    """The disk's identity, to find its default parent: serial/WWID, else the table's
    disk GUID or id, else (an image without either) its path and size."""
    for key in ("serial", "wwid", "disk_id"):
        if disk.get(key):
            return {key: disk[key]}
    return {"path": disk["path"], "size": disk["size"]}
