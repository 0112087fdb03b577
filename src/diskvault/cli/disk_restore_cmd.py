"""diskvault disk restore REPO::ARCHIVE TARGET [--partition N] [--dry-run] [--force]

Registered by disk_backup_cmd (the `disk` group loads that module by name).
"""

from __future__ import annotations

import argparse

from ..archive.disk_restore import DiskArchive, describe, execute
from ..archive.extract import Damage, damage_lines
from ..archive.image_target import restore_target
from ..archive.view import ArchiveView
from . import log
from .common import READ, add_common, open_repo, report_warnings, split_location
from .options import add_restore_options, make_progress
from .output import fmt_size


def register_disk(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="restore a disk archive onto a disk or image, or one partition",
        description="Restore a `disk backup` archive onto a block device or image file of "
        "the same or a larger size (a missing image file is created, sparse; a larger GPT "
        "disk gets its backup GPT moved to the new end), or one partition (--partition N) "
        "onto a partition, device or file. Nothing is written when the target is mounted, "
        "too small, or (without --force) holds another disk's table or a filesystem.")
    add_common(p)
    p.add_argument("--partition", type=int, metavar="N", help="restore only partition N")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="print what would be written where; write nothing")
    p.add_argument("--force", action="store_true",
                   help="overwrite a target holding another partition table or a filesystem")
    p.add_argument("--image-format", metavar="FMT",
                   help="write TARGET as a VM image of this format (raw, qcow2, vmdk, vhdx, "
                   "vdi); default: by its extension (.qcow2 ...), else raw")
    add_restore_options(p)
    p.add_argument("location", metavar="REPO::ARCHIVE")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    repo_loc, name = split_location(args.location, need_archive=True)
    with open_repo(repo_loc, READ, args.lock_wait) as repo:
        arch = DiskArchive.from_view(ArchiveView.open(repo, name or ""))
        with restore_target(repo, arch, args.target, args.partition, args.force,
                            args.image_format, args.dry_run) as plan:
            if args.dry_run:
                print("\n".join(describe(plan, fmt_size)))
                print("Nothing written (--dry-run).")
                return 0
            progress = make_progress(args, "disk restore")
            damage: list[Damage] | None = [] if args.continue_on_error else None
            result = execute(repo, plan, args.workers, progress, damage)
            if progress:
                progress.done()
    if args.progress:
        log.info(f"restored {fmt_size(plan.size)} onto {args.target}: "
                 f"{fmt_size(result.written)} written, {fmt_size(result.blank)} zero/unused")
    return report_warnings(damage_lines(damage or []))
