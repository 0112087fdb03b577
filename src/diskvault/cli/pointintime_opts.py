"""The options `create` and `disk backup` share for a point in time on the host:
--snapshot btrfs, --fsfreeze MOUNTPOINT, --pre-command, --post-command."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import diskvault

from ..archive.create import CreateOptions, refuse_taken_name
from ..repository.repo import Repository, keys_dir
from ..repository.security import cache_dir, security_dir
from ..source.pointintime import PointInTime, PointInTimeOptions
from . import log


def add_point_in_time(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("point in time (live VM images; see docs/host-snapshots.md)")
    g.add_argument("--snapshot", choices=["btrfs"], default=None,
                   help="read the sources from a read-only snapshot of the btrfs "
                   "subvolume holding them, deleted afterwards")
    g.add_argument("--fsfreeze", action="append", default=[], metavar="MOUNTPOINT",
                   help="freeze this filesystem while its sources are read (repeatable)")
    g.add_argument("--fsfreeze-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="thaw after this long at most and fail the backup (default 60)")
    g.add_argument("--pre-command", metavar="CMD",
                   help="shell command run before anything is read (e.g. virsh suspend)")
    g.add_argument("--post-command", metavar="CMD",
                   help="shell command run afterwards, always, if --pre-command ran")


def point_in_time_options(args: argparse.Namespace) -> PointInTimeOptions:
    return PointInTimeOptions(snapshot=args.snapshot, fsfreeze=list(args.fsfreeze),
                              fsfreeze_timeout=args.fsfreeze_timeout,
                              pre_command=args.pre_command, post_command=args.post_command)


def enter_point_in_time(stack: contextlib.ExitStack, pit_opts: PointInTimeOptions,
                        paths: list[str], repo_loc: str, repo: Repository, name: str,
                        opts: CreateOptions) -> PointInTime | None:
    """Take the point in time the options ask for (None if they ask for none), undone when
    ``stack`` closes. A taken archive name stops us before a pre-command runs; the archive
    is committed only if the point in time still holds then (a freeze past its deadline)."""
    if not pit_opts.active:
        return None
    refuse_taken_name(repo, name)
    pit = stack.enter_context(PointInTime(pit_opts, paths, protected_paths(repo_loc),
                                          warn=log.warning))
    opts.before_commit = pit.check
    return pit


def protected_paths(repo_loc: str) -> dict[str, str]:
    """What diskvault needs while a freeze lasts (so must not be frozen)."""
    out = {
        "the cache dir": cache_dir(),
        "the security dir": security_dir(),
        "the keys dir": keys_dir(),
        "diskvault's code": os.path.dirname(os.path.abspath(diskvault.__file__)),
        "Python": os.path.realpath(sys.executable),
        "Python's library": os.path.dirname(os.__file__),
    }
    if repo_loc.startswith("file://"):
        out["the repository"] = repo_loc[len("file://"):]
    elif not repo_loc.startswith(("s3:", "sftp://", "ssh://")):
        out["the repository"] = repo_loc
    return out


def print_notes(notes: list[str]) -> None:
    for n in notes:
        log.info(n)
