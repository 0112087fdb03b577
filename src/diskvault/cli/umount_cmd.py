"""diskvault umount MOUNTPOINT"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("umount", help="unmount a diskvault mount (also after its process died)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..archive.mounting import unmount

    unmount(args.mountpoint)
    return 0
