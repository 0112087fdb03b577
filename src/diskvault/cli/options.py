"""Argument groups several commands share, so each option has one spelling and one help."""

from __future__ import annotations

import argparse

from ..archive.create import CreateOptions
from ..chunking.base import ChunkerParams
from ..repository.compression import DEFAULT_COMPRESSION, Compression
from .progress import Progress


def _connections(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected a number of connections from 1 to 64: {s!r}")
    return n


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--progress", action="store_true",
                   help="show progress: a live line on a terminal, otherwise a plain line "
                   "every few seconds (Borg's progress_percent JSON lines with --log-json)")


def make_progress(args: argparse.Namespace, operation: str) -> Progress | None:
    """The progress display the options ask for, or None without --progress."""
    if not args.progress:
        return None
    return Progress(operation, log_json=args.log_json)


def add_restore_options(p: argparse.ArgumentParser) -> None:
    """What every command that writes an archive's content out takes (extract, disk
    restore)."""
    p.add_argument("--continue-on-error", action="store_true",
                   help="restore past unreadable chunks: zeros there, every damaged range "
                   "listed, exit code 1")
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    add_progress(p)


def add_archive_options(p: argparse.ArgumentParser, stats_help: str = "print statistics"
                        ) -> None:
    """What every command that writes an archive takes (create, disk backup)."""
    p.add_argument("--chunker-params", type=ChunkerParams.parse, default=None,
                   metavar="PARAMS", help="fixed,SIZE[,HEADER] or fastcdc,MIN,AVG,MAX "
                   "(default: fixed,4194304 for files and devices, "
                   "fastcdc,524288,2097152,8388608 for streams)")
    p.add_argument("-C", "--compression", type=Compression.parse,
                   default=DEFAULT_COMPRESSION, metavar="SPEC",
                   help="none, lz4, zstd[,L], auto,C[,L] (default auto,lz4)")
    p.add_argument("--comment", default="")
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--upload-connections", type=_connections, default=None, metavar="N",
                   help="upload N packs at once (default: 4 for S3 and SFTP, 1 for a "
                   "local directory; each costs one pack of memory, 32 MiB by default)")
    p.add_argument("-n", "--dry-run", action="store_true", help="read and count, store nothing")
    add_progress(p)
    p.add_argument("-s", "--stats", action="store_true", help=stats_help)
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (Borg's keys, plus diskvault's figures)")


def create_options(args: argparse.Namespace, progress: Progress | None) -> CreateOptions:
    return CreateOptions(compression=args.compression, chunker=args.chunker_params,
                         workers=args.workers, dry_run=args.dry_run, comment=args.comment,
                         upload_threads=args.upload_connections, progress=progress)
