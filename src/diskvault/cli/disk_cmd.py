"""``diskvault disk``: the disk command group; ``disk list`` shows disks and partitions.

``disk backup`` and ``disk restore`` live in disk_backup_cmd.py / disk_restore_cmd.py and
join the group through ``register_disk(disk_subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..source.disks import Disk, list_disks
from . import disk_backup_cmd, disk_restore_cmd
from .output import fmt_size


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "disk", help="list, back up and restore whole disks",
        description="Disk-level commands: find disks by serial, back up and restore them.",
    )
    subparsers = parser.add_subparsers(
        dest="disk_command", metavar="SUBCOMMAND", parser_class=type(parser)
    )
    subparsers.required = True
    p = subparsers.add_parser(
        "list", help="list disks, serials, partitions and filesystems",
        description="List block devices (disks and loop devices) with model, serial, "
        "partitions, filesystem types and mountpoints. Read from sysfs; no udev needed.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_list)
    disk_backup_cmd.register_disk(subparsers)
    disk_restore_cmd.register_disk(subparsers)


def run_list(args: argparse.Namespace) -> int:
    disks = list_disks()
    if args.json:
        json.dump({"disks": [d.to_dict() for d in disks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_disks(disks))
    return 0


def format_disks(disks: list[Disk]) -> str:
    """A table like lsblk's: one row per disk, its partitions indented below it."""
    rows: list[list[str]] = [["DEVICE", "SIZE", "START", "FSTYPE", "MOUNTPOINT",
                              "MODEL / TYPE", "SERIAL"]]
    notes: dict[int, list[str]] = {}
    for d in disks:
        model = f"loop of {d.backing_file}" if d.backing_file else (d.model or "-")
        if d.backing_file and (d.loop_offset or d.loop_sizelimit):
            model += f" @{d.loop_offset}+{d.loop_sizelimit or 'end'}"
        table = f"[{d.label}]" if d.label else ""
        rows.append([d.path, human(d.size), "", d.fs_type or table or "-",
                     ",".join(d.mountpoints) or "-", model, d.serial or d.wwid or "-"])
        extra = [f"note: {n}" for n in d.table_notes]
        if d.table_error:
            extra.append(f"partition table not read: {d.table_error}")
        if extra:
            notes[len(rows) - 1] = extra
        for p in d.partitions:
            rows.append([f"  {p.number:>2} {p.path or ''}".rstrip(), human(p.size),
                         human(p.start), p.fs_type or "-", ",".join(p.mountpoints) or "-",
                         p.type_name or "-", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.rjust(w) if col in (1, 2) else c.ljust(w)
                 for col, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        lines += [f"     {n}" for n in notes.get(i, [])]
    if not disks:
        lines.append("(no block devices found)")
    return "\n".join(lines) + "\n"


def human(n: int) -> str:
    """Binary units with one decimal (4.0 MiB), like lsblk; exact bytes below 1 KiB."""
    return fmt_size(n, binary=True)
